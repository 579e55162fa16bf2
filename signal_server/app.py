"""Application factories: the signaling sub-app, and the standalone root app.

``create_app(settings)`` returns a self-contained ``web.Application`` that a
host mounts with ``host.add_subapp("/webrtc", create_app(settings))``; aiohttp
forwards the host's start-up, shutdown and cleanup signals to it, so the
sub-app's lifecycle follows the host's. ``create_standalone_app`` is what the
``signal-server`` command serves: the same routes and lifecycle installed
straight on its root app under ``/webrtc`` (a sub-app would cost every request
a second URL dispatch; the command has no host to isolate from), plus the
operational endpoints and the demo page at the root.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp_cors
from aiohttp import web

from .context import SIGNALING, Signaling
from .demo import add_demo_routes, client_module
from .errors import CloseCode
from .handlers import OPERATIONS, config_handler, websocket_handler
from .keepalive import keep_alive
from .logs import install_token_redaction
from .settings import Settings

__all__ = ["create_app", "create_standalone_app"]

OperationView = Callable[[Signaling], Awaitable[web.Response]]


def create_app(settings: Settings) -> web.Application:
    """Build the signaling sub-app (``/config``, ``/ws/{room_id}``, client module, health, metrics).

    Raises:
        ValueError: when no JWT secret or public key is configured.
    """
    app = web.Application()
    _install(app, settings, prefix="")
    return app


def create_standalone_app(settings: Settings) -> web.Application:
    """The app the command serves: ``/webrtc/*``, root health and metrics, the demo page."""
    root = web.Application()
    _install(root, settings, prefix="/webrtc")
    add_demo_routes(root, settings)
    return root


def _install(app: web.Application, settings: Settings, prefix: str) -> None:
    """Put the signaling service, its routes and its lifecycle on ``app``."""
    sig = app[SIGNALING] = Signaling(settings)
    app.router.add_get(f"{prefix}/ws/{{room_id}}", websocket_handler)
    config_route = app.router.add_get(f"{prefix}/config", config_handler, allow_head=False)
    module_route = app.router.add_get(f"{prefix}/signal-client.js", client_module, allow_head=False)
    for path, view in OPERATIONS.items():  # beside the routes in a sub-app; at the root standalone
        app.router.add_get(path, _operation(sig, view))
    origins = settings.allowed_origins or ("*",)
    cors = aiohttp_cors.setup(
        app,
        defaults={
            origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
                allow_headers=("Authorization", "Content-Type"), max_age=600
            )
            for origin in origins
        },
    )
    cors.add(config_route)
    cors.add(module_route)  # module scripts are fetched with CORS
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_connections)
    install_token_redaction()


def _operation(sig: Signaling, view: OperationView) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return await view(sig)

    return handler


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    sig = app[SIGNALING]
    keepalive = asyncio.create_task(keep_alive(sig.peers, sig.settings.heartbeat))
    sig.ready = True
    yield
    sig.ready = False
    keepalive.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keepalive
    sig.hub.cancel_timers()


async def _close_connections(app: web.Application) -> None:
    """On shutdown every client gets close 1001; their slots stay held (not a leave)."""
    sig = app[SIGNALING]
    sig.ready = False
    sig.hub.close_all(CloseCode.GOING_AWAY)
