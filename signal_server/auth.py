"""JWT verification (one verifier for HTTP and WebSocket) and token minting.

Only the configured algorithm is accepted, so an HS256 token signed with an
RS256 public key as its "secret" is refused (no key confusion), and
``alg: none`` never passes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import SignalError
from .protocol import MAX_USER_ID_LENGTH
from .settings import Settings

__all__ = ["Identity", "TokenVerifier", "mint_token", "MAX_TOKEN_LENGTH"]

MAX_TOKEN_LENGTH = 8 * 1024
MAX_ROOMS_CLAIM = 1000
_NAME_CLAIMS = ("username", "name", "preferred_username")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str
    username: str
    rooms: frozenset[str] | None  # None: any room

    def may_join(self, room_id: str) -> bool:
        return self.rooms is None or room_id in self.rooms


def _unauthorized(detail: str) -> SignalError:
    return SignalError("UNAUTHORIZED", detail)


class TokenVerifier:
    """Turns a bearer token into an :class:`Identity` or raises UNAUTHORIZED."""

    def __init__(self, settings: Settings, leeway: float = 5.0) -> None:
        key = settings.jwt_public_key or settings.jwt_secret
        if not key:
            raise ValueError("no JWT secret or public key configured")
        self._key = key
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = leeway
        self._options: Any = {
            "require": ["exp", "sub"],
            "verify_aud": settings.jwt_audience is not None,
            "verify_iss": settings.jwt_issuer is not None,
        }

    def verify(self, token: str | None) -> Identity:
        """Verify ``token`` and read its claims.

        Raises:
            SignalError: ``UNAUTHORIZED`` with a client-safe reason.
        """
        if not token:
            raise _unauthorized("a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("token is too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"invalid token ({type(exc).__name__})") from None
        return _identity(claims)


def _identity(claims: dict[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_USER_ID_LENGTH:
        raise _unauthorized(f"'sub' must be 1-{MAX_USER_ID_LENGTH} characters")
    username = sub
    for claim in _NAME_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            username = value.strip()[:MAX_USER_ID_LENGTH]
            break
    rooms: frozenset[str] | None = None
    if "rooms" in claims:
        raw = claims["rooms"]
        if (
            not isinstance(raw, list)
            or len(raw) > MAX_ROOMS_CLAIM
            or not all(isinstance(room, str) for room in raw)
        ):
            raise _unauthorized("'rooms' must be a list of room ids")
        rooms = frozenset(raw)
    return Identity(sub, username, rooms)


def mint_token(
    secret: str,
    sub: str,
    *,
    name: str | None = None,
    ttl: int = 3600,
    rooms: Iterable[str] | None = None,
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """Sign a token for ``sub`` (used by ``signal-server token`` and dev mode)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl}
    if name:
        claims["name"] = name
    if rooms is not None:
        claims["rooms"] = list(rooms)
    return jwt.encode(claims, secret, algorithm=algorithm)
