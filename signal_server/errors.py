"""Error codes and WebSocket close codes of the wire contract, in one place.

Every error a client can see is a :class:`SignalError`. Whether it ends the
connection, and with which close code, is a property of its code, so handlers
never pick close codes themselves.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CloseCode", "SignalError", "FATAL_CLOSE_CODES", "StartupError"]


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (docs/protocol.md lists them)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    INVALID_ROOM = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    SLOW_CONSUMER = 4408
    ROOM_FULL = 4409
    SESSION_REPLACED = 4410
    KICKED = 4411
    ROOM_CLOSED = 4412
    RATE_LIMITED = 4429
    TOO_MANY_CONNECTIONS = 4430
    TOO_MANY_ROOMS = 4431


# Codes that end the connection; every other code is reported and the
# connection stays open. RATE_LIMITED is fatal only once abuse is sustained,
# so its first reports are raised with ``fatal=False``.
FATAL_CLOSE_CODES: dict[str, CloseCode] = {
    "UNAUTHORIZED": CloseCode.UNAUTHORIZED,
    "FORBIDDEN": CloseCode.FORBIDDEN,
    "INVALID_ROOM": CloseCode.INVALID_ROOM,
    "ROOM_FULL": CloseCode.ROOM_FULL,
    "SESSION_REPLACED": CloseCode.SESSION_REPLACED,
    # The app's backend removed the participant, or ended the room (admin API).
    "KICKED": CloseCode.KICKED,
    "ROOM_CLOSED": CloseCode.ROOM_CLOSED,
    "RATE_LIMITED": CloseCode.RATE_LIMITED,
    "MESSAGE_TOO_LARGE": CloseCode.MESSAGE_TOO_BIG,
    "TOO_MANY_CONNECTIONS": CloseCode.TOO_MANY_CONNECTIONS,
    "TOO_MANY_ROOMS": CloseCode.TOO_MANY_ROOMS,
    "SERVER_BUSY": CloseCode.TRY_AGAIN_LATER,
    # Fatal for a join (the registry is unreachable); a relayed message that
    # cannot cross nodes gets it with fatal=False.
    "UNAVAILABLE": CloseCode.TRY_AGAIN_LATER,
    "SLOW_CONSUMER": CloseCode.SLOW_CONSUMER,
}


class SignalError(Exception):
    """An error reported to the client as an ``error`` message.

    ``message`` always starts with the code: the guide's client only passes
    ``payload.message`` on and looks for the code inside it.
    """

    def __init__(self, code: str, detail: str, *, fatal: bool | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.message = f"{code}: {detail}"
        self.close_code: CloseCode | None = FATAL_CLOSE_CODES.get(code)
        if fatal is False:
            self.close_code = None
        elif fatal is True and self.close_code is None:
            raise ValueError(f"{code} has no close code")


class StartupError(Exception):
    """The server cannot start as configured (one line for the command to print)."""
