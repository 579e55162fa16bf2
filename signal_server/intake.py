"""Every byte a client sends is metered before aiohttp parses it.

The message rate limit sees only what aiohttp hands the handler: whole
messages and control frames. A client can make aiohttp work without ever
finishing a message (one text frame without FIN, then empty continuation
frames for ever, answering our pings so that it looks alive): measured, three
such connections kept a core busy and nothing was ever counted. So the
connection's parser is wrapped, and each chunk read from the socket spends
its size from a byte bucket (``--receive-rate`` bytes a second, bursts of
``--receive-burst``). A client past it is cut off with ``RATE_LIMITED`` and
4429, and nothing more it sent is parsed.

The wrapper is installed on aiohttp's protocol object (``_payload_parser``,
a private attribute, checked at install time and by the tests): aiohttp has
no public hook that sees the bytes of an upgraded connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

__all__ = ["MeteredParser", "meter_intake"]


class _Parser(Protocol):
    def feed_data(self, data: bytes) -> Any: ...

    def feed_eof(self) -> Any: ...


class MeteredParser:
    """Spends each chunk's size from a byte bucket, then lets the real parser have it."""

    __slots__ = ("_parser", "_rate", "_burst", "_tokens", "_stamp", "_on_flood", "_clock")

    def __init__(
        self, parser: _Parser, rate: float, burst: float, on_flood: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._parser = parser
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._stamp = clock()
        self._on_flood: Callable[[], None] | None = on_flood

    def feed_data(self, data: bytes) -> Any:
        now = self._clock()
        tokens = self._tokens + (now - self._stamp) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        self._stamp = now
        tokens -= len(data)
        self._tokens = tokens
        if tokens < 0:
            on_flood = self._on_flood
            if on_flood is not None:
                self._on_flood = None
                on_flood()
            return False, b""  # parse nothing more: the connection is being cut off
        return self._parser.feed_data(data)

    def feed_eof(self) -> Any:
        return self._parser.feed_eof()


def meter_intake(request: web.Request, rate: float, burst: float, on_flood: Callable[[], None]) -> bool:
    """Wrap the upgraded connection's parser; False if aiohttp's internals are not as expected."""
    protocol: Any = request.protocol
    parser = getattr(protocol, "_payload_parser", None)
    if parser is None or not callable(getattr(parser, "feed_data", None)):
        return False
    protocol._payload_parser = MeteredParser(parser, rate, burst, on_flood)
    return True
