"""A loopback TCP proxy that can go silent: the network dies with no FIN and no RST.

``stall()`` stops forwarding both ways and stops reading, so bytes pile up in
the kernel buffers on each side and neither end learns anything: exactly what
a phone leaving Wi-Fi looks like to the server. It stalls the connections open
at that moment; later ones are forwarded, as after a switch to another network
(a browser's reconnect must get through while its old socket hangs).

``pause()`` and ``resume()`` hold traffic instead: what is read waits, in
order, and passes on ``resume()`` (a node whose link to Redis lags); on every
connection, or on one (by the order they were accepted in).
"""

from __future__ import annotations

import asyncio
import contextlib


class StallProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Event] = set()  # one per connection: set when it is stalled
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._flows: list[asyncio.Event] = []  # one per connection, in the order accepted

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def stall(self) -> int:
        """On every open connection, from now on nothing passes and nothing is read,
        in either direction. Returns how many connections were stalled."""
        for stalled in self._open:
            stalled.set()
        return len(self._open)

    def upstream_ports(self) -> list[int]:
        """The local port of each connection to the target, in the order accepted."""
        return [writer.get_extra_info("sockname")[1] for writer in self._writers[1::2]]

    def pause(self, connection: int | None = None) -> None:
        """Hold everything read from now on, both ways, on every connection or on one."""
        (self._flowing if connection is None else self._flows[connection]).clear()

    def resume(self) -> None:
        """Pass on what was held, in order, and everything after it, on every connection."""
        self._flowing.set()
        for flowing in self._flows:
            flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in self._writers:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        self._writers += [client_writer, server_writer]
        stalled = asyncio.Event()
        self._open.add(stalled)
        flowing = asyncio.Event()
        flowing.set()
        self._flows.append(flowing)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer, stalled, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, event: asyncio.Event,
        flowing: asyncio.Event,
    ) -> None:
        stalled = asyncio.ensure_future(event.wait())
        try:
            while True:
                read = asyncio.ensure_future(reader.read(65536))
                await asyncio.wait({read, stalled}, return_when=asyncio.FIRST_COMPLETED)
                if stalled.done():
                    # Whatever was read stays here, never forwarded; the
                    # socket is no longer read, so its buffers fill.
                    read.cancel()
                    await asyncio.Event().wait()  # until close() cancels us
                data = read.result()
                await self._flowing.wait()
                await flowing.wait()
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.transport.abort()
        finally:
            stalled.cancel()
