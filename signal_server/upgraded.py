"""What an upgraded connection no longer needs from aiohttp's HTTP layer, released.

Once aiohttp has switched a connection to WebSocket, every byte goes to the
WebSocket reader (``protocol._payload_parser``, see intake.py); the
protocol's HTTP request parser is never used again (aiohttp reads it only
while the connection is not upgraded, or when an upgrade was declined), yet
it stays referenced for the life of the socket: about 1.1 KiB per idle
connection (the parser object and the buffers it allocated). It is dropped
here, after checking that aiohttp's state is what this relies on; with an
aiohttp that looks otherwise nothing is touched.

What stays, because aiohttp's own frames hold it until the handler returns
(``RequestHandler.start()`` keeps the request, its parsed message and the
handler task in locals), is listed in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["release_http_parser"]


def release_http_parser(request: web.Request) -> bool:
    """Drop the upgraded connection's HTTP parser; False when aiohttp's internals are not as expected."""
    protocol: Any = request.protocol
    if (
        getattr(protocol, "_upgraded", None) is not True
        or getattr(protocol, "_payload_parser", None) is None
        or getattr(protocol, "_parser", None) is None
    ):
        return False
    protocol._parser = None
    return True
