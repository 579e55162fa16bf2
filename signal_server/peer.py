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

__all__ = ["WebSocketPeer", "text_frame"]

logger = logging.getLogger(__name__)

_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
_FIN_TEXT = 0x81
_PING = bytes((0x89, 0))
_SLOW_CLOSE_GRACE = 1.0  # seconds to flush the close frame before a reset


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

    __slots__ = ("ws", "room_id", "last_seen", "_transport", "_limit", "_closing", "_on_slow", "_tasks")

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        room_id: str | None,
        max_send_buffer: int,
        on_slow: Callable[[], None] | None = None,
    ) -> None:
        self.ws = ws
        self.room_id = room_id
        self._transport = transport
        self._limit = max_send_buffer
        self._closing = False
        self._on_slow = on_slow
        self._tasks: set[asyncio.Task[None]] | None = None  # a close in progress, if any
        self.last_seen = time.monotonic()  # stamped by the handler on every frame

    @property
    def closing(self) -> bool:
        return self._closing or self.ws.closed

    def send(self, frame: bytes) -> None:
        transport = self._transport
        if self._closing or self.ws.closed or transport.is_closing():
            return
        transport.write(text_frame(frame))
        if transport.get_write_buffer_size() > self._limit:
            self._close_slow_consumer()

    def ping(self) -> None:
        """A WebSocket ping (keepalive); the pong shows up as activity."""
        self._write_control(_PING)

    def pong(self, data: bytes) -> None:
        """Answer a client's ping (aiohttp's autoping is off, see keepalive.py)."""
        self._write_control(bytes((0x8A, len(data))) + data)  # control payloads are <= 125 bytes

    def _write_control(self, frame: bytes) -> None:
        if not self.closing and not self._transport.is_closing():
            self._transport.write(frame)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a dead peer)."""
        self._transport.abort()

    def send_error(self, error: SignalError) -> None:
        self.send(encode_error(error, self.room_id))

    def close(self, code: CloseCode, error: SignalError | None = None) -> None:
        """Send ``error`` (if any), then a close frame with ``code``; never blocks."""
        if self._closing or self.ws.closed:
            return
        if error is not None:
            self.send_error(error)
        self._closing = True
        tasks = self._tasks = self._tasks or set()
        task = asyncio.get_running_loop().create_task(self._close(code))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def wait_closed(self) -> None:
        """Wait for a close started by :meth:`close` (bounded by aiohttp's close timeout)."""
        while self._tasks:
            await next(iter(self._tasks))

    async def _close(self, code: CloseCode) -> None:
        try:
            await self.ws.close(code=code)
        except (ConnectionError, RuntimeError):  # the transport died first
            self._transport.abort()

    def _close_slow_consumer(self) -> None:
        """Over the send bound: stop writing, send a close frame, abort if unread."""
        self._closing = True
        if self._on_slow is not None:
            self._on_slow()
        transport = self._transport
        transport.write(_close_frame(CloseCode.SLOW_CONSUMER))
        # close() flushes what is buffered, then closes; a client that never
        # reads would hold the buffer for ever, so abort after a short wait.
        transport.close()
        asyncio.get_running_loop().call_later(_SLOW_CLOSE_GRACE, transport.abort)


def _close_frame(code: CloseCode) -> bytes:
    body = struct.pack("!H", code)
    return bytes((0x88, len(body))) + body
