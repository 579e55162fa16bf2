"""The wire codec: client text in, validated messages out; envelopes in, bytes out.

This is the only module that parses or writes JSON. It never raises anything
but :class:`SignalError` for bad input, whatever the bytes (see the
hypothesis tests), and it encodes each outgoing message exactly once so a
broadcast hands the same bytes to every recipient.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .errors import SignalError

__all__ = [
    "RELAYED_TYPES",
    "ClientMessage",
    "parse_client_message",
    "encode_envelope",
    "encode_server_message",
    "encode_error",
    "utc_timestamp",
    "MAX_PAYLOAD_DEPTH",
    "MAX_USER_ID_LENGTH",
    "SERVER_SENDER_ID",
    "SERVER_MESSAGE",
    "payload_too_deep",
]

RELAYED_TYPES = frozenset({"offer", "answer", "ice_candidate"})
MAX_PAYLOAD_DEPTH = 16
MAX_USER_ID_LENGTH = 128
# The type and ``sender_id`` of a message from the app's backend (room service
# API). No token can carry an empty ``sub``, so no participant can pose as it.
SERVER_MESSAGE = "server_message"
SERVER_SENDER_ID = ""

# (type, payload, target_user_id or None)
ClientMessage = tuple[str, dict[str, Any], str | None]

_PING: ClientMessage = ("ping", {}, None)


def _invalid(detail: str) -> SignalError:
    return SignalError("INVALID_MESSAGE", detail)


def _too_deep(values: Any, depth: int) -> bool:
    """True when the containers among ``values`` nest deeper than ``depth`` levels.

    The bound matters: orjson parses 1,024 levels but encodes only 255, so a
    deep payload would parse and then fail to relay. Signaling payloads are
    flat, so the common case is one pass of cheap type checks.
    """
    for item in values:
        kind = type(item)
        if kind is dict or kind is list:
            if depth <= 0 or _too_deep(item.values() if kind is dict else item, depth - 1):
                return True
    return False


def payload_too_deep(payload: dict[str, Any]) -> bool:
    """True when ``payload`` nests deeper than relayed payloads may (:data:`MAX_PAYLOAD_DEPTH`)."""
    return _too_deep(payload.values(), MAX_PAYLOAD_DEPTH - 1)


def parse_client_message(data: str | bytes) -> ClientMessage:
    """Decode and validate one client frame.

    Only ``type`` and ``payload`` are read; anything else a client puts in the
    envelope (``sender_id``, ``room_id``, ``timestamp``) is ignored because
    the server stamps those itself.

    Raises:
        SignalError: ``INVALID_MESSAGE`` or ``UNSUPPORTED_TYPE`` (both non-fatal).
    """
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _invalid("frame is not valid JSON") from None
    if not isinstance(message, dict):
        raise _invalid("a message must be a JSON object")
    kind = message.get("type")
    if kind == "ping":
        return _PING
    if not isinstance(kind, str):
        raise _invalid("'type' must be a string")
    if kind not in RELAYED_TYPES:
        raise SignalError("UNSUPPORTED_TYPE", f"unsupported message type {kind[:32]!r}")
    payload = message.get("payload")
    if not isinstance(payload, dict):
        raise _invalid(f"{kind} needs an object 'payload'")
    if kind == "ice_candidate":
        if not isinstance(payload.get("candidate"), str):
            raise _invalid("ice_candidate needs a string 'candidate'")
        mid = payload.get("sdp_mid")
        if mid is not None and not isinstance(mid, str):
            raise _invalid("'sdp_mid' must be a string or null")
        index = payload.get("sdp_m_line_index")
        if index is not None and (type(index) is not int):
            raise _invalid("'sdp_m_line_index' must be an integer or null")
    else:
        if payload.get("type") != kind:
            raise _invalid(f"{kind} needs payload.type == {kind!r}")
        if not isinstance(payload.get("sdp"), str):
            raise _invalid(f"{kind} needs a string 'sdp'")
    target = payload.get("target_user_id")
    if target is not None and (
        not isinstance(target, str) or not 0 < len(target) <= MAX_USER_ID_LENGTH
    ):
        raise _invalid("'target_user_id' must be a user id string")
    if _too_deep(payload.values(), MAX_PAYLOAD_DEPTH - 1):
        raise _invalid(f"payload nests deeper than {MAX_PAYLOAD_DEPTH} levels")
    return kind, payload, target


class _TimestampCache:
    """ISO 8601 UTC timestamps with milliseconds, formatted once per millisecond.

    Formatting a datetime costs microseconds; at tens of thousands of messages
    a second most share their millisecond, so the string is reused.
    """

    __slots__ = ("_millis", "_text")

    def __init__(self) -> None:
        self._millis = -1
        self._text = ""

    def __call__(self) -> str:
        millis = int(time.time() * 1000)
        if millis != self._millis:
            seconds, ms = divmod(millis, 1000)
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
                f".{ms:03d}Z"
            )
            self._millis = millis
        return self._text


utc_timestamp = _TimestampCache()

_dumps = orjson.dumps


def encode_envelope(kind: str, payload: dict[str, Any], sender_id: str, room_id: str) -> bytes:
    """Encode a relayed message, stamped by the server."""
    return _dumps(
        {
            "type": kind,
            "payload": payload,
            "sender_id": sender_id,
            "room_id": room_id,
            "timestamp": utc_timestamp(),
        }
    )


def encode_server_message(kind: str, payload: dict[str, Any], room_id: str | None) -> bytes:
    """Encode a message the server itself originates (no ``sender_id``)."""
    return _dumps(
        {"type": kind, "payload": payload, "room_id": room_id, "timestamp": utc_timestamp()}
    )


def encode_error(error: SignalError, room_id: str | None) -> bytes:
    """Encode an ``error`` message whose ``message`` starts with its code."""
    return encode_server_message(
        "error", {"code": error.code, "message": error.message}, room_id
    )
