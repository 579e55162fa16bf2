"""The browser side the server ships: the client module, the demo page, dev tokens.

The client module is part of the signaling sub-app (embedders serve it too);
the demo page and ``/dev/token`` belong to the standalone command, and
``/dev/token`` exists only in dev mode, where the secret is random and the
server listens on loopback alone.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .auth import mint_token_for
from .settings import Settings

__all__ = ["STATIC", "DEMO_POLICY", "client_module", "add_demo_routes"]

STATIC = Path(__file__).parent / "static"
_DEV_USER = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_DEV_TOKEN_TTL = 24 * 3600
_NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The demo page runs its own two files and talks to its own origin only
# (WebSocket included: CSP's 'self' covers ws: and wss: of the same host).
# No other site may frame it: a framed page could be clicked into a call.
DEMO_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_DEMO_HEADERS = {
    **_NO_CACHE,
    "Content-Security-Policy": DEMO_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str, headers: dict[str, str] = _NO_CACHE) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers=headers)


async def client_module(request: web.Request) -> web.FileResponse:
    """GET /signal-client.js: the browser ES module (no build step needed)."""
    return _static("signal-client.js")


def add_demo_routes(root: web.Application, settings: Settings) -> None:
    """The demo page at / (and /dev/token in dev mode) on the standalone root app."""

    def page_file(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
        async def serve(request: web.Request) -> web.FileResponse:
            return _static(name, _DEMO_HEADERS)

        return serve

    root.router.add_get("/", page_file("index.html"))
    root.router.add_get("/demo.js", page_file("demo.js"))
    root.router.add_get("/demo.css", page_file("demo.css"))
    if settings.dev_mode:
        async def dev_token(request: web.Request) -> web.Response:
            user = request.query.get("user", "")
            if not _DEV_USER.match(user):
                raise web.HTTPBadRequest(text="user: 1-64 characters of A-Z a-z 0-9 . _ -\n")
            name = request.query.get("name") or user
            token = mint_token_for(settings, user, name=name[:128], ttl=_DEV_TOKEN_TTL)
            return web.json_response({"token": token}, headers={"Cache-Control": "no-store"})

        root.router.add_get("/dev/token", dev_token)
