"""HTTP and WebSocket handlers: the thin I/O shell around the hub.

The WebSocket handler is the only task that reads its socket. It admits the
connection (limits, origin, token, room), joins the hub, then loops: rate
limit, parse, route. How the connection ended decides between leaving at
once (a clean close by the client) and holding the slot for a resume.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
import time
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import WSMessage, WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from multidict import MultiMapping
from yarl import URL

from .admission import PER_ADDRESS
from .auth import Identity
from .context import SIGNALING, Signaling
from .errors import CloseCode, SignalError
from .intake import meter_intake
from .peer import CLOSE_TIMEOUT, WebSocketPeer, close_bounded
from .protocol import encode_server_message, parse_client_message
from .ratelimit import MessageRateLimiter, Verdict
from .upgraded import release_http_parser

__all__ = ["config_handler", "websocket_handler", "OPERATIONS"]

logger = logging.getLogger(__name__)

# Not "." or "..": a browser's URL parser would turn those paths into others.
ROOM_ID = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9._~-]{1,64}\Z")
# A client's close frame with one of these codes is a deliberate leave. 0 is
# how aiohttp reports a close frame with no status code (the guide's
# disconnect() and wscat send that); 1005 is its on-the-wire name.
CLEAN_CLOSE_CODES = frozenset({0, 1000, 1001, 1005})


def bearer_token(request: web.Request) -> str | None:
    """The ``Authorization: Bearer`` token; two such headers are refused (a proxy in
    front may have judged the other one)."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise SignalError("UNAUTHORIZED", "two Authorization headers; send one")
    header = headers[0] if headers else ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


# ------------------------------------------------------------------ config


def turn_credentials(secret: str, user_id: str, ttl: int, now: float) -> tuple[str, str]:
    """TURN REST API (coturn use-auth-secret): ``expiry:user`` and its HMAC-SHA1."""
    username = f"{int(now) + ttl}:{user_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_configuration(sig: Signaling, identity: Identity, now: float) -> dict[str, Any]:
    """The guide's snake_case config plus the camelCase keys RTCPeerConnection reads."""
    settings = sig.settings
    servers: list[dict[str, Any]] = []
    if settings.stun_urls:
        servers.append({"urls": list(settings.stun_urls)})
    body: dict[str, Any] = {}
    if settings.turn_urls:
        turn: dict[str, Any] = {"urls": list(settings.turn_urls)}
        if settings.turn_secret:
            username, credential = turn_credentials(
                settings.turn_secret, identity.user_id, settings.turn_ttl, now
            )
            turn.update(username=username, credential=credential, ttl=settings.turn_ttl)
            body["ttl"] = settings.turn_ttl
        elif settings.turn_username and settings.turn_credential:
            turn.update(username=settings.turn_username, credential=settings.turn_credential)
        servers.append(turn)
    policies = {"ice_transport_policy": "all", "bundle_policy": "balanced", "rtcp_mux_policy": "require"}
    body.update(ice_servers=servers, **policies)
    body.update(
        iceServers=servers,
        iceTransportPolicy=policies["ice_transport_policy"],
        bundlePolicy=policies["bundle_policy"],
        rtcpMuxPolicy=policies["rtcp_mux_policy"],
    )
    return body


def unauthorized_response(error: SignalError, request: web.Request) -> web.Response:
    """401 with a Bearer challenge; its error code only when a bearer token was
    presented (RFC 6750 3.1: a request with none gets the bare challenge)."""
    presented = any(value[:7].lower() == "bearer " for value in request.headers.getall("Authorization", []))
    challenge = 'Bearer realm="signal-server"' + (', error="invalid_token"' if presented else "")
    return web.json_response(
        {"error": "UNAUTHORIZED", "message": error.message}, status=401, headers={"WWW-Authenticate": challenge}
    )


async def config_handler(request: web.Request) -> web.Response:
    """GET /config: ICE servers for the bearer of a valid token."""
    sig = request.app[SIGNALING]
    try:
        identity = sig.verifier.verify(bearer_token(request))
    except SignalError as error:
        sig.metrics.errors[error.code] += 1
        return unauthorized_response(error, request)
    return web.json_response(
        ice_configuration(sig, identity, time.time()), headers={"Cache-Control": "no-store"}
    )


# ---------------------------------------------------------------- websocket


def _origin_tuple(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the default port filled in; None for anything that is not an origin."""
    try:
        url = URL(origin)
        if url.path not in ("", "/") or url.query_string or url.user or url.fragment:
            return None
        return (url.scheme.lower(), (url.host or "").lower(), url.port)
    except ValueError:
        return None


def origin_allowed(sig: Signaling, request: web.Request) -> bool:
    """No Origin (non-browser), an open allow-list, a listed origin, or our own origin."""
    origins = request.headers.getall("Origin", [])
    if not origins:
        return True
    if len(origins) > 1:  # no browser sends two: someone is testing which one we read
        return False
    origin = origins[0]
    allowed = sig.settings.allowed_origins
    if not allowed or "*" in allowed or origin.rstrip("/") in allowed:
        return True
    # Same origin: a page served by this very server (the demo page, say),
    # scheme included, so an http:// page cannot pass for an https:// one.
    scheme_here = sig.client_address.scheme(request.remote, request.headers, request.scheme)
    theirs = _origin_tuple(origin)
    return theirs is not None and theirs[1] != "" and theirs == _origin_tuple(f"{scheme_here}://{request.host}")


def _report(sig: Signaling, peer: WebSocketPeer, error: SignalError) -> None:
    """Send an ``error`` message and count it: the one way errors reach a client."""
    sig.metrics.errors[error.code] += 1
    peer.send_error(error)


async def _refuse(ws: web.WebSocketResponse, peer: WebSocketPeer, sig: Signaling, error: SignalError) -> None:
    """Report a fatal error in-band (browsers cannot read HTTP statuses), then close, bounded."""
    _report(sig, peer, error)
    await close_bounded(ws, peer.transport, error.close_code or CloseCode.NORMAL, error.code.encode())


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """GET /ws/{room_id}: one participant's signaling connection.

    Admits (limits, origin, token, room), joins, relays until the connection
    ends, then leaves or holds the slot. Refuses in-band; never lets a bug
    take the socket silently. One coroutine for all of it, its rare steps
    synchronous helpers: every idle connection keeps each coroutine of its
    handler's chain (a few hundred bytes apiece) and each bound method a
    frame caches (64 bytes), so there are none to keep.
    """
    sig = request.app[SIGNALING]
    settings = sig.settings
    ws = web.WebSocketResponse(
        timeout=CLOSE_TIMEOUT,  # how long a close waits for the client's close frame
        # Keepalive is one sweep per app (keepalive.py), not aiohttp's
        # per-connection heartbeat; so pings and pongs come to this handler.
        autoping=False,
        max_msg_size=settings.max_message_size,
        compress=False,
        # Text frames stay bytes: orjson parses (and UTF-8-validates) them
        # directly, which saves a decode per message.
        decode_text=False,
    )
    await ws.prepare(request)  # a plain HTTP request gets aiohttp's 400 here
    transport = request.transport
    if transport is None:  # the client went away during the handshake
        return ws
    release_http_parser(request)
    # The handshake's response headers are on the wire; nothing reads them again,
    # and a WebSocket would hold them (a few hundred bytes) for its whole life.
    ws.headers.clear()
    room_id = request.match_info["room_id"]
    peer = WebSocketPeer(
        ws, transport, room_id if ROOM_ID.match(room_id) else None,
        settings.max_send_buffer, on_limit=sig.metrics.limit_close,
    )
    if not meter_intake(request, settings.receive_rate, settings.receive_burst, peer.flooded):
        _warn_unmetered()
    if _forwarded(request.headers) and not sig.client_address.trusts(request.remote):
        sig.hints.untrusted_forwarding(request.remote or "unknown")
    address = sig.client_address(request.remote, request.headers)
    # Counted from here to the end, refused or not: a refused socket is open
    # until its close completes.
    refusal = sig.admission.admit_address(address, time.monotonic())
    try:
        if refusal is not None:
            error, limit = refusal
            sig.metrics.refused[limit] += 1
            if limit in PER_ADDRESS:
                error = _per_address_refusal(sig, address, error)
            await _refuse(ws, peer, sig, error)
            return ws
        try:
            identity = _admit(sig, request, room_id)
            # Nothing below reads the request (aiohttp's own frames still hold it).
            del request
            user = identity.user_id
            user_refusal = sig.admission.admit_user(user)
            if user_refusal is not None:
                sig.metrics.refused["user_concurrent"] += 1
                raise user_refusal
            sig.peers.add(peer)
            try:
                hub = sig.hub
                slot = await hub.join(room_id, identity, peer)
                # JSON logs carry room and user as fields.
                logger.info("join room=%s user=%s", room_id, user, extra={"room": room_id, "user": user})
                clean = False
                try:
                    limiter = MessageRateLimiter(settings.rate_limit, settings.rate_burst, time.monotonic())
                    while True:  # the per-message loop
                        message = await ws.receive()
                        kind_of_frame = message.type
                        now = peer.last_seen = time.monotonic()
                        # Every frame a client can send costs us work, so every one counts
                        # toward its rate, except the pong answering a ping of ours.
                        if (
                            kind_of_frame is _TEXT or kind_of_frame is _BINARY or kind_of_frame is _PING
                            or (kind_of_frame is _PONG and not peer.take_pong(message.data))
                        ):
                            verdict = limiter.check(now)
                            if verdict is not _ALLOW:
                                if verdict is Verdict.CLOSE:
                                    sig.metrics.limit_closes["rate_limit"] += 1
                                    await _refuse(ws, peer, sig, SignalError("RATE_LIMITED", "sustained flooding"))
                                    break
                                _rate_limited(sig, peer, verdict)
                            elif kind_of_frame is _TEXT:  # the hot path, inline: no call per message
                                try:
                                    kind, payload, target = parse_client_message(message.data)
                                except SignalError as error:
                                    _report(sig, peer, error)
                                    continue
                                if kind == "ping":
                                    peer.notify(encode_server_message("pong", {}, room_id))
                                elif slot.peer is peer:  # else kicked, closed or taken over: it goes nowhere
                                    failure = hub.route(slot, kind, payload, target)
                                    if failure is not None:
                                        _report(sig, peer, failure)
                            else:
                                _control(sig, peer, kind_of_frame, message.data)
                        elif kind_of_frame is _PONG:
                            continue  # an answer to our keepalive ping: last_seen is already stamped
                        else:
                            clean = _ended(sig, message)
                            break
                finally:
                    if clean:
                        await hub.leave(slot, peer, "left")
                    else:
                        await hub.drop(slot, peer)
                    code = peer.close_code_sent or ws.close_code  # ours if we closed first, else the client's
                    logger.info(
                        "close room=%s user=%s clean=%s code=%s", room_id, user, clean, code,
                        extra={"room": room_id, "user": user, "clean": clean, "code": code},
                    )
                await peer.wait_closed()
            finally:
                sig.peers.discard(peer)
                sig.admission.release_user(user)
        except SignalError as error:
            await _refuse(ws, peer, sig, error)
        except Exception:
            # A bug, not the client's doing: the hub is all-or-nothing, so the
            # room is intact; log it once and tell the client with 1011.
            logger.exception("internal error on a connection to room %r", peer.room_id)
            sig.metrics.errors["INTERNAL_ERROR"] += 1
            await close_bounded(ws, peer.transport, CloseCode.INTERNAL_ERROR, b"INTERNAL_ERROR")
    finally:
        sig.admission.release_address(address, refusal)
    return ws


_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
_ALLOW = Verdict.ALLOW


@functools.cache
def _warn_unmetered() -> None:
    logger.warning("this aiohttp version hides the WebSocket parser: --receive-rate is not enforced")


def query_tokens(request: web.Request) -> list[str]:
    """Every ``token`` query parameter, decoded as aiohttp's URL parser decodes it.

    Read from the raw request target, not ``request.query``: that parses the
    whole query into a MultiDict cached on the request and its URL, which a
    WebSocket would then keep for its whole life (about 0.5 KiB, the
    decoded token included).
    """
    query = request.raw_path.partition("?")[2].partition("#")[0]
    tokens = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "token" or (("%" in name or "+" in name) and unquote_plus(name) == "token"):
            tokens.append(unquote_plus(value))
    return tokens


def _admit(sig: Signaling, request: web.Request, room_id: str) -> Identity:
    """Origin, token, room id and the token's room list, in that order."""
    if not origin_allowed(sig, request):
        sig.hints.refused_origin(request.headers.get("Origin", ""), "WebSocket")
        raise SignalError("FORBIDDEN", "this origin is not allowed")
    tokens = query_tokens(request)
    if len(tokens) > 1:
        raise SignalError("UNAUTHORIZED", "two token parameters; send one")
    token = (tokens[0] if tokens else None) or bearer_token(request)
    identity = sig.verifier.verify(token)
    if not ROOM_ID.match(room_id):
        raise SignalError("INVALID_ROOM", "room ids are 1-64 characters of A-Z a-z 0-9 . _ ~ - (not . or ..)")
    if not identity.may_join(room_id):
        raise SignalError("FORBIDDEN", f"this token may not join room {room_id!r}")
    return identity


def _forwarded(headers: MultiMapping[str]) -> bool:
    return "X-Forwarded-For" in headers or "Forwarded" in headers


def _per_address_refusal(sig: Signaling, address: str, error: SignalError) -> SignalError:
    """A per-IP refusal, logged (rate-limited) and, when the address counted looks like a
    reverse proxy's and none is trusted, with a pointer to --trusted-proxy."""
    hint = sig.hints.proxy_hint(address)
    sig.hints.per_ip_refusal(address, error.message + hint)
    if not hint:
        return error
    return SignalError(error.code, error.message.partition(": ")[2] + hint)


def _rate_limited(sig: Signaling, peer: WebSocketPeer, verdict: Verdict) -> None:
    """A frame over the message rate: dropped, and reported once in a while."""
    sig.metrics.rate_limited += 1
    if verdict is Verdict.DROP_AND_REPORT:
        _report(sig, peer, SignalError("RATE_LIMITED", "too many messages; message dropped", fatal=False))


def _control(sig: Signaling, peer: WebSocketPeer, kind_of_frame: WSMsgType, data: Any) -> None:
    """A ping (answered), an unsolicited pong (counted, nothing else) or a binary frame (refused)."""
    if kind_of_frame is _PING:
        peer.pong(data)
    elif kind_of_frame is _BINARY:
        _report(sig, peer, SignalError("INVALID_MESSAGE", "binary frames are not supported; send JSON text"))


def _ended(sig: Signaling, message: WSMessage) -> bool:
    """The frame that ends the loop: True for a clean close by the client."""
    if message.type is WSMsgType.CLOSE:
        return message.data in CLEAN_CLOSE_CODES
    # CLOSING (we closed it), CLOSED (transport lost), ERROR
    if message.type is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
        if message.data.code == CloseCode.MESSAGE_TOO_BIG:
            sig.metrics.limit_closes["message_too_large"] += 1
            sig.metrics.errors["MESSAGE_TOO_LARGE"] += 1
    return False


# ------------------------------------------------------------ operations
# These take the Signaling object rather than the request, so the standalone
# root app can serve them at /healthz etc. for the sub-app mounted at /webrtc.


async def healthz(sig: Signaling) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(sig: Signaling) -> web.Response:
    """Readiness: started and not shutting down."""
    if sig.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def metrics_view(sig: Signaling) -> web.Response:
    """Prometheus text exposition."""
    return web.Response(
        body=sig.metrics.exposition(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


OPERATIONS = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_view}
