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
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp_cors
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from .admin import add_admin_routes
from .context import SIGNALING, Signaling
from .demo import add_demo_routes, client_module
from .errors import CloseCode
from .handlers import OPERATIONS, config_handler, origin_allowed, websocket_handler
from .keepalive import keep_alive
from .logs import install_token_redaction
from .settings import EXAMPLE_SECRETS, Settings

logger = logging.getLogger("signal_server")

__all__ = ["create_app", "create_standalone_app"]

OperationView = Callable[[Signaling], Awaitable[web.Response]]


def create_app(settings: Settings) -> web.Application:
    """Build the signaling sub-app (``/config``, ``/ws/{room_id}``, client module, health, metrics).

    Raises:
        ValueError: when no JWT secret or public key is configured.
    """
    if settings.jwt_secret in EXAMPLE_SECRETS or settings.webhook_secret in EXAMPLE_SECRETS:
        # The host app binds its own address, unknown here: say it, as the command refuses it off loopback.
        logger.warning("an example secret from the documentation is configured: fine for a try on loopback only")
    app = web.Application()
    _install(app, settings, prefix="")
    return app


def create_standalone_app(settings: Settings) -> web.Application:
    """The app the command serves: ``/webrtc/*``, root health and metrics, the demo page."""
    root = web.Application(middlewares=[_loopback_host_only] if settings.dev_mode else [])
    _install(root, settings, prefix="/webrtc")
    add_demo_routes(root, settings)
    return root


def _install(app: web.Application, settings: Settings, prefix: str) -> None:
    """Put the signaling service, its routes and its lifecycle on ``app``."""
    sig = app[SIGNALING] = Signaling(settings)
    # No HEAD: a HEAD request with upgrade headers would otherwise join the room.
    app.router.add_get(f"{prefix}/ws/{{room_id}}", websocket_handler, allow_head=False)
    config_route = app.router.add_get(f"{prefix}/config", config_handler, allow_head=False)
    module_route = app.router.add_get(f"{prefix}/signal-client.js", client_module, allow_head=False)
    add_admin_routes(app, prefix)  # the room service API for the app's backend
    for path, view in OPERATIONS.items():  # beside the routes in a sub-app; at the root standalone
        app.router.add_get(path, _operation(sig, view))
    origins = settings.allowed_origins or ("*",)
    hooks_before = list(app.on_response_prepare)
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
    # aiohttp-cors answers every response; a WebSocket's is none of its business
    # (no CORS on the upgrade route), so its hooks run from ours, for plain HTTP only.
    cors_hooks = [hook for hook in app.on_response_prepare if hook not in hooks_before]
    for hook in cors_hooks:
        app.on_response_prepare.remove(hook)
    node = sig.hub.node
    if node is not None:  # clustered: say which node answered (to see where a tab landed)
        app.on_response_prepare.append(_node_header(node))
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_connections)
    cors_resources: set[object] = {config_route.resource, module_route.resource}
    app.on_response_prepare.append(_plain_http_hook(cors_hooks, sig, cors_resources))
    install_token_redaction()


ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[object]]


def _plain_http_hook(hooks: list[ResponseHook], sig: Signaling, cors_resources: set[object]) -> ResponseHook:
    """The one response hook: nothing for a WebSocket's upgrade (a join pays for no hook
    that has nothing to do), ``hooks`` (CORS) and the close for every other response.

    It also logs a CORS request (the config fetch or its preflight) from an origin the
    allow-list refuses: the page only sees a failed fetch, which reads like a server down.
    """
    listed = bool(sig.settings.allowed_origins) and "*" not in sig.settings.allowed_origins

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.WebSocketResponse):
            return
        for hook in hooks:
            await hook(request, response)
        if listed and "Origin" in request.headers and request.match_info.route.resource in cors_resources:
            if not origin_allowed(sig, request):
                sig.hints.refused_origin(request.headers["Origin"], f"CORS {request.method} {request.path}")
        _close_after_plain_http(response)

    return prepare


def _close_after_plain_http(response: web.StreamResponse) -> None:
    """One plain HTTP response per connection: a client that pipelines requests and never reads
    would otherwise hold the socket and a growing send queue with no limit counting it (only
    WebSockets are counted). The few requests a page makes do not miss keep-alive."""
    response.force_close()
    response.headers["Connection"] = "close"  # the headers are already made when this hook runs


@web.middleware
async def _loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Dev mode: refuse any Host that is not a loopback name (DNS rebinding).

    A page on evil.example whose name is rebound to 127.0.0.1 is same-origin
    with this server in the browser's eyes, and could fetch /dev/token and
    join the developer's rooms; its requests still say ``Host: evil.example``.
    """
    if not _is_loopback_host(request.host):
        raise web.HTTPMisdirectedRequest(text="dev mode answers only to localhost, 127.0.0.1 and [::1]\n")
    return await handler(request)


def _is_loopback_host(host_header: str | None) -> bool:
    """``localhost`` or a loopback IP address, parsed (``127.evil.example`` is a name, not an address)."""
    try:
        host = URL(f"http://{host_header}").host if host_header else None
    except ValueError:
        return False
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _node_header(node: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Signal-Node"] = node

    return add


def _operation(sig: Signaling, view: OperationView) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return await view(sig)

    return handler


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    sig = app[SIGNALING]
    await sig.hub.start()
    if sig.webhooks is not None:
        await sig.webhooks.start(sig.hub.webhook_source())
    keepalive = asyncio.create_task(keep_alive(sig.peers, sig.settings.heartbeat))
    sig.started = True
    yield
    sig.started = False
    keepalive.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keepalive
    sig.hub.cancel_timers()
    if sig.webhooks is not None:  # first: a cluster node's unfinished events go back as it deregisters
        await sig.webhooks.stop()
    await sig.hub.stop()


async def _close_connections(app: web.Application) -> None:
    """On shutdown every client gets close 1001; their slots stay held (not a leave)."""
    sig = app[SIGNALING]
    sig.started = False
    sig.hub.close_all(CloseCode.GOING_AWAY)
