"""A live WebSocket as the hub sees it: non-blocking sends with a bounded buffer.

Why not ``await ws.send_str()`` per recipient: aiohttp's send waits for the
socket to drain once its buffer is over the high-water mark, so one client
that stops reading would stall the sender's handler and every other
recipient behind it. Instead each message becomes one ready-made text frame
(RFC 6455, unmasked, no extensions: the response is created with
``compress=False``) written to the transport without waiting. The
transport's unsent bytes are the per-connection queue; when they pass
``max_send_buffer`` the peer is a slow consumer and is closed, and memory
stays bounded whatever a client does.

The peer also knows whether a relayed frame may have been lost, which is
what a resume's ``recovered`` must tell the truth about. Writing a frame to
a socket proves nothing (a dead network swallows what the kernel holds), so
every keepalive ping carries the number of frames relayed so far and the
client's pong echoes it: frames up to that number were read. A connection
that ends with relayed frames unconfirmed, or that dropped a frame (closing,
too slow), is ``lost``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable

from aiohttp import web

from .errors import CloseCode, SignalError
from .protocol import encode_error

__all__ = ["WebSocketPeer", "text_frame", "close_bounded", "CLOSE_TIMEOUT"]

logger = logging.getLogger(__name__)

_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
_FIN_TEXT = 0x81
_PING_HEADER = bytes((0x89, 8))  # a ping whose payload is the relayed count, 8 bytes
_COUNT = struct.Struct("!Q")
_MAX_PINGS_OUT = 8  # a client this far behind is dropped by the keepalive long before
_SLOW_CLOSE_GRACE = 1.0  # seconds to flush the close frame before a reset
# Seconds a closing handshake may take: the client's close frame, or a reset.
# A refused or closed client must not hold its socket for aiohttp's 10 s.
CLOSE_TIMEOUT = 1.0


def text_frame(data: bytes) -> bytes:
    """One unmasked, final WebSocket text frame carrying ``data``."""
    length = len(data)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + data
    if length < 65536:
        return _HEADER_16(_FIN_TEXT, 126, length) + data
    return _HEADER_64(_FIN_TEXT, 127, length) + data


class WebSocketPeer:
    """Writes frames to one client and closes it on request or on overflow."""

    __slots__ = (
        "ws", "room_id", "last_seen", "relayed", "_acked", "_pings_out", "_dropped",
        "_transport", "_limit", "_closing", "_on_limit", "_tasks",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        room_id: str | None,
        max_send_buffer: int,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        """``on_limit`` is told the name of a limit that closes this peer (one callable per app:
        a closure per connection would cost memory on every idle one)."""
        self.ws = ws
        self.room_id = room_id
        self._transport = transport
        self._limit = max_send_buffer
        self._closing = 0  # the close code we sent, once we started closing
        self._on_limit = on_limit
        self._tasks: set[asyncio.Task[None]] | None = None  # a close in progress, if any
        self.last_seen = time.monotonic()  # stamped by the handler on every frame
        self.relayed = 0  # relayed frames handed to this peer
        self._acked = 0  # of which the client confirmed reading this many
        # Payloads of pings not answered yet, oldest first. A list, made at the
        # first ping: an empty deque costs 600 bytes, a list of a few 100.
        self._pings_out: list[bytes] | None = None
        self._dropped = False  # a frame was discarded

    @property
    def transport(self) -> asyncio.Transport:
        return self._transport

    @property
    def closing(self) -> bool:
        return bool(self._closing) or self.ws.closed

    @property
    def lost(self) -> bool:
        """True when a relayed frame was dropped, or is not known to have been read."""
        return self._dropped or self.relayed > self._acked

    @property
    def unconfirmed(self) -> bool:
        """Relayed frames the client has not confirmed yet (the keepalive pings for them)."""
        return self.relayed > self._acked

    def send(self, frame: bytes) -> None:
        """A message that would be kept for a held slot (counted: its delivery must be confirmed)."""
        self.relayed += 1
        self.notify(frame)

    def notify(self, frame: bytes) -> None:
        """Send a message of the server's own (room state, errors, pong): not counted."""
        transport = self._transport
        if self._closing or self.ws.closed or transport.is_closing():
            self._dropped = True
            return
        transport.write(text_frame(frame))
        if transport.get_write_buffer_size() > self._limit:
            self._close_slow_consumer()

    def ping(self) -> None:
        """A keepalive ping carrying the relayed count; its pong confirms those frames."""
        pings = self._pings_out
        if pings is None:
            pings = self._pings_out = []
        payload = _COUNT.pack(self.relayed)
        if self._write_control(_PING_HEADER + payload):
            if len(pings) >= _MAX_PINGS_OUT:
                del pings[0]  # the oldest is given up on: a later pong confirms more anyway
            pings.append(payload)

    def take_pong(self, data: bytes) -> bool:
        """Record a client's pong. False when it answers no ping of ours (rate-limit it).

        Pongs come back in order, so a genuine one echoes the oldest
        outstanding ping exactly; anything else is unsolicited.
        """
        pings = self._pings_out
        if not pings or data not in pings:
            return False
        while pings.pop(0) != data:
            pass  # pings the client skipped (RFC 6455 lets it answer only the latest)
        (count,) = _COUNT.unpack(data)
        if count > self._acked:
            self._acked = count
        return True

    def pong(self, data: bytes) -> None:
        """Answer a client's ping (aiohttp's autoping is off, see keepalive.py)."""
        self._write_control(bytes((0x8A, len(data))) + data)  # control payloads are <= 125 bytes

    def _write_control(self, frame: bytes) -> bool:
        """Write a control frame under the same send bound as messages; True when written."""
        transport = self._transport
        if self.closing or transport.is_closing():
            return False
        transport.write(frame)
        if transport.get_write_buffer_size() > self._limit:
            self._close_slow_consumer()
        return True

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a dead peer)."""
        self._transport.abort()

    @property
    def close_code_sent(self) -> int | None:
        """The code of the close frame this server sent (what the client got), if it closed first."""
        return int(self._closing) or None

    def send_error(self, error: SignalError) -> None:
        self.notify(encode_error(error, self.room_id))

    def close(self, code: CloseCode, error: SignalError | None = None) -> None:
        """Send ``error`` (if any), then a close frame with ``code``; never blocks."""
        if self._closing or self.ws.closed:
            return
        if error is not None:
            self.send_error(error)
        self._closing = code
        tasks = self._tasks = self._tasks or set()
        task = asyncio.get_running_loop().create_task(self._close(code))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def wait_closed(self) -> None:
        """Wait for a close started by :meth:`close` (bounded by aiohttp's close timeout)."""
        while self._tasks:
            await next(iter(self._tasks))

    async def _close(self, code: CloseCode) -> None:
        await close_bounded(self.ws, self._transport, code)

    def _close_slow_consumer(self) -> None:
        """Over the send bound: stop writing, send a close frame, abort if unread."""
        if self._on_limit is not None:
            self._on_limit("slow_consumer")
        self.cut_off(CloseCode.SLOW_CONSUMER)

    def flooded(self) -> None:
        """Past --receive-rate: cut off at once (nothing more it sends is parsed)."""
        if self._on_limit is not None:
            self._on_limit("byte_rate")
        self.cut_off(CloseCode.RATE_LIMITED, SignalError("RATE_LIMITED", "too many bytes sent; connection closed"))

    def cut_off(self, code: CloseCode, error: SignalError | None = None) -> None:
        """End the connection now, without a closing handshake: ``error`` and a close frame, then a reset.

        For a client that must not be read or written any more (too slow, flooding).
        """
        if self._closing:
            return
        if error is not None:
            self.send_error(error)
        self._closing = code
        self._dropped = True  # what sits in the buffer may never be read
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(_close_frame(code))
        # close() flushes what is buffered, then closes; a client that never
        # reads would hold the buffer for ever, so abort after a short wait.
        transport.close()
        asyncio.get_running_loop().call_later(_SLOW_CLOSE_GRACE, transport.abort)


async def close_bounded(
    ws: web.WebSocketResponse, transport: asyncio.Transport, code: int, message: bytes = b""
) -> None:
    """Close within :data:`CLOSE_TIMEOUT`, then reset a client that did not answer.

    aiohttp waits for the client's close frame (bounded by the response's
    ``timeout``) but not for its own close frame to drain, and after a
    timeout it closes the transport gracefully, which a client that never
    reads can hold open for ever; so the whole close is bounded here and an
    unanswered one ends in a reset.
    """
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=message)
    except (TimeoutError, ConnectionError, RuntimeError):
        transport.abort()
        return
    if ws.close_code == 1006:  # the client never answered our close frame
        transport.abort()


def _close_frame(code: CloseCode) -> bytes:
    body = struct.pack("!H", code)
    return bytes((0x88, len(body))) + body
