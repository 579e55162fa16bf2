"""A minimal WebSocket client over a raw TCP stream, for what a polite client won't do.

The tests need to vanish without a close frame, close with exact codes (or
none), stop reading entirely, or never finish the HTTP upgrade. aiohttp's
client does none of that on purpose, so this speaks RFC 6455 by hand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

from .conftest import TIMEOUT


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str, *, read_buffer: int | None = None,
        headers: list[tuple[str, str]] | None = None, local_host: str | None = None,
    ) -> RawWebSocket:
        """Upgrade ``path``; ``headers`` are sent as given, repeated names included.

        ``local_host`` picks the source address (127.0.0.2 is loopback too: a
        second client address on one machine).
        """
        local_addr = (local_host, 0) if local_host else None
        reader, writer = await asyncio.open_connection(host, port, limit=2**20, local_addr=local_addr)
        if read_buffer is not None:
            import socket

            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, read_buffer)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers or ())
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def _frame(self, opcode: int, data: bytes) -> bytes:
        mask = os.urandom(4)
        length = len(data)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return header + mask + masked

    def send_frame(self, opcode: int, data: bytes = b"") -> None:
        """Any frame at all: pongs nobody asked for, pings, binary."""
        self.writer.write(self._frame(opcode, data))

    def send_json(self, value: dict[str, Any]) -> None:
        self.writer.write(self._frame(0x1, json.dumps(value).encode()))

    def close(self, code: int | None) -> None:
        """Send a close frame, with ``code`` or with no status code at all."""
        body = b"" if code is None else struct.pack("!H", code)
        self.writer.write(self._frame(0x8, body))

    def abort(self) -> None:
        """Vanish: no close frame, the TCP connection reset."""
        self.writer.transport.abort()

    async def aclose(self) -> None:
        """Release the socket at the end of a test, whatever state it is in."""
        self.writer.transport.abort()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            while True:
                first, second = await self.reader.readexactly(2)
                length = second & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
                data = await self.reader.readexactly(length)
                opcode = first & 0x0F
                if opcode == 0x9:  # answer pings like a live browser would
                    self.writer.write(self._frame(0xA, data))
                    continue
                return opcode, data

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        opcode, data = await self.recv_frame(timeout)
        assert opcode == 0x1, (opcode, data)
        value: dict[str, Any] = json.loads(data)
        return value

    async def expect(self, kind: str) -> dict[str, Any]:
        message = await self.recv()
        assert message["type"] == kind, message
        return message
