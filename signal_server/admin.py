"""The room service API: what the app's backend asks and steers (docs/protocol.md).

``GET /rooms``, ``GET /rooms/{room_id}``, ``DELETE /rooms/{room_id}/participants/{user_id}``,
``DELETE /rooms/{room_id}`` and ``POST /rooms/{room_id}/messages``, under the
signaling prefix. Every request needs a bearer token with the admin grant
(``"admin": true``), verified by the same :class:`TokenVerifier` as a
WebSocket's token, so a participant's token, an expired one or an ``alg``
trick is refused the same way. Path parts are validated like the WebSocket's,
bodies are bounded by ``--max-message-size``, and the work itself is the hub's
(one node, or the cluster through Redis): nothing here touches the relay path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .auth import Identity, clean_text
from .context import SIGNALING, Signaling
from .errors import SignalError
from .handlers import ROOM_ID, bearer_token, unauthorized_response
from .protocol import MAX_USER_ID_LENGTH, SERVER_MESSAGE, SERVER_SENDER_ID, encode_envelope, payload_too_deep

__all__ = ["add_admin_routes", "MAX_BAN_SECONDS"]

logger = logging.getLogger(__name__)

MAX_BAN_SECONDS = 366 * 86400
_BODY_KEYS = frozenset({"payload", "target_user_id"})

AdminView = Callable[[web.Request, Signaling, Identity], Awaitable[web.Response]]


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error shape of ``/config``: ``{"error": CODE, "message": "CODE: detail"}``."""
    return web.json_response(
        {"error": code, "message": f"{code}: {detail}"}, status=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


class _Refusal(Exception):
    """A request refused with a JSON error (raised by the validators below)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.response = error_response(status, code, detail)


def _guarded(view: AdminView) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Admin grant first, then the view; refusals and an unreachable registry become JSON errors."""

    async def handler(request: web.Request) -> web.Response:
        sig = request.app[SIGNALING]
        try:
            identity = sig.verifier.verify_admin(bearer_token(request))
        except SignalError as error:
            sig.metrics.errors[error.code] += 1
            if error.code == "UNAUTHORIZED":
                return unauthorized_response(error, request)
            return error_response(403, error.code, error.message.partition(": ")[2])
        try:
            return await view(request, sig, identity)
        except _Refusal as refusal:
            return refusal.response
        except SignalError as error:  # UNAVAILABLE: the cluster registry cannot be reached
            return error_response(503, error.code, error.message.partition(": ")[2])

    return handler


def _room_id(request: web.Request, identity: Identity) -> str:
    room_id = request.match_info["room_id"]
    if not ROOM_ID.match(room_id):
        raise _Refusal(400, "INVALID_ROOM", "room ids are 1-64 characters of A-Z a-z 0-9 . _ ~ - (not . or ..)")
    if not identity.may_join(room_id):  # an admin token with a 'rooms' claim steers those rooms only
        raise _Refusal(403, "FORBIDDEN", f"this token may not manage room {room_id!r}")
    return room_id


def _user_id(value: Any, what: str) -> str:
    """A user id as a token's ``sub`` may be: 1-128 characters of clean text."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_USER_ID_LENGTH or clean_text(value) != value:
        raise _Refusal(400, "INVALID_REQUEST", f"{what} must be a user id (1-{MAX_USER_ID_LENGTH} clean characters)")
    return value


def _ban(request: web.Request) -> int:
    raw = request.query.getall("ban", [])
    if not raw:
        return 0
    if len(raw) > 1 or not raw[0].isascii() or not raw[0].isdigit() or int(raw[0]) > MAX_BAN_SECONDS:
        raise _Refusal(400, "INVALID_REQUEST", f"ban must be a whole number of seconds, 0-{MAX_BAN_SECONDS}")
    return int(raw[0])


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes without reading more than that."""
    if request.content_length is not None and request.content_length > limit:
        raise _Refusal(413, "MESSAGE_TOO_LARGE", f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _Refusal(413, "MESSAGE_TOO_LARGE", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _not_found(detail: str) -> web.Response:
    return error_response(404, "NOT_FOUND", detail)


# ------------------------------------------------------------------ views


async def list_rooms(request: web.Request, sig: Signaling, identity: Identity) -> web.Response:
    rooms = await sig.hub.list_rooms()
    if identity.rooms is not None:
        rooms = [room for room in rooms if room["room_id"] in identity.rooms]
    rooms.sort(key=lambda room: room["room_id"])
    return web.json_response({"rooms": rooms}, headers={"Cache-Control": "no-store"})


async def show_room(request: web.Request, sig: Signaling, identity: Identity) -> web.Response:
    room_id = _room_id(request, identity)
    participants = await sig.hub.describe_room(room_id)
    if participants is None:
        return _not_found(f"no room {room_id!r}")
    return web.json_response(
        {"room_id": room_id, "participants": participants}, headers={"Cache-Control": "no-store"}
    )


async def kick(request: web.Request, sig: Signaling, identity: Identity) -> web.Response:
    room_id = _room_id(request, identity)
    user_id = _user_id(request.match_info["user_id"], "the user id")
    ban = _ban(request)
    if not await sig.hub.kick(room_id, user_id, ban):
        return _not_found(f"no participant {user_id[:64]!r} in room {room_id!r}")
    logger.info(
        "admin kick room=%s user=%s ban=%s by=%s", room_id, user_id, ban, identity.user_id,
        extra={"room": room_id, "user": user_id, "ban": ban, "admin": identity.user_id},
    )
    return web.json_response({"room_id": room_id, "user_id": user_id, "removed": True, "ban": ban})


async def close_room(request: web.Request, sig: Signaling, identity: Identity) -> web.Response:
    room_id = _room_id(request, identity)
    ban = _ban(request)
    if not await sig.hub.close_room(room_id, ban):
        return _not_found(f"no room {room_id!r}")
    logger.info(
        "admin close room=%s ban=%s by=%s", room_id, ban, identity.user_id,
        extra={"room": room_id, "ban": ban, "admin": identity.user_id},
    )
    return web.json_response({"room_id": room_id, "closed": True, "ban": ban})


async def send_message(request: web.Request, sig: Signaling, identity: Identity) -> web.Response:
    room_id = _room_id(request, identity)
    body = await _read_body(request, sig.settings.max_message_size)
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Refusal(400, "INVALID_REQUEST", "the body is not valid JSON") from None
    if not isinstance(message, dict):
        raise _Refusal(400, "INVALID_REQUEST", "the body must be a JSON object")
    unknown = set(message) - _BODY_KEYS
    if unknown:
        raise _Refusal(400, "INVALID_REQUEST", f"unknown field {sorted(unknown)[0][:32]!r}")
    payload = message.get("payload")
    if not isinstance(payload, dict):
        raise _Refusal(400, "INVALID_REQUEST", "'payload' must be a JSON object")
    if payload_too_deep(payload):
        raise _Refusal(400, "INVALID_REQUEST", "'payload' nests too deep")
    target = message.get("target_user_id")
    if target is not None:
        target = _user_id(target, "'target_user_id'")
    frame = encode_envelope(SERVER_MESSAGE, payload, SERVER_SENDER_ID, room_id)
    sent = await sig.hub.server_message(room_id, frame, target)
    if sent is None:
        if target is not None:
            return _not_found(f"no participant {target[:64]!r} in room {room_id!r}")
        return _not_found(f"no room {room_id!r}")
    if target is None:
        return web.json_response({"room_id": room_id, "sent": True})
    if sent == "lost":
        return error_response(409, "NOT_DELIVERED", (
            f"participant {target[:64]!r} is disconnected and messages for it can no longer be kept "
            "(too many kept, or its node died); its resume will say recovered: false"
        ))
    return web.json_response({"room_id": room_id, "sent": True, "held": sent == "kept"})


def add_admin_routes(app: web.Application, prefix: str) -> None:
    """The room service routes under ``prefix`` (no CORS: backends call them, not pages)."""
    app.router.add_get(f"{prefix}/rooms", _guarded(list_rooms), allow_head=False)
    app.router.add_get(f"{prefix}/rooms/{{room_id}}", _guarded(show_room), allow_head=False)
    app.router.add_delete(f"{prefix}/rooms/{{room_id}}", _guarded(close_room))
    app.router.add_delete(f"{prefix}/rooms/{{room_id}}/participants/{{user_id}}", _guarded(kick))
    app.router.add_post(f"{prefix}/rooms/{{room_id}}/messages", _guarded(send_message))
