"""JWT verification (one verifier for HTTP and WebSocket) and token minting.

Only the configured algorithm is accepted, so an HS256 token signed with an
RS256 public key as its "secret" is refused (no key confusion), and
``alg: none`` never passes. The key is prepared once, at start-up: a key that
does not fit the algorithm stops the server there (:class:`KeyConfigError`)
instead of failing every request, and no token pays for parsing a PEM.

Every string a token brings is checked before anything encodes it: a ``sub``
that is not clean text (a lone UTF-16 surrogate, a control character) is
refused, and a display name is cleaned rather than refused, because apps cut
names with JavaScript's ``slice`` and the user should not be locked out.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import get_default_algorithms

from .errors import SignalError
from .jwtdecode import decoder_for
from .protocol import MAX_USER_ID_LENGTH
from .settings import MIN_SECRET_BYTES, Settings
from .tokencache import VerifiedTokenCache, token_digest

__all__ = [
    "Identity", "TokenVerifier", "KeyConfigError", "mint_token", "mint_token_for", "clean_text", "MAX_TOKEN_LENGTH",
]

MAX_TOKEN_LENGTH = 8 * 1024
MIN_RSA_BITS = 2048  # RFC 7518 3.3
MAX_ROOMS_CLAIM = 1000
_NAME_CLAIMS = ("username", "name", "preferred_username")
# C0 and C1 controls and line separators (they would forge log lines),
# bidirectional overrides and isolates (they would make "Bob" read as
# another name on a page) and lone surrogates (no encoder can write them:
# orjson refuses, so does UTF-8).
_CONTROLS = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069"
_UNCLEAN = re.compile(f"[{_CONTROLS}\\ud800-\\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(f"[{_CONTROLS}]+")


def clean_text(text: str) -> str:
    """``text`` with lone surrogates as U+FFFD and runs of control characters as one space."""
    if not _UNCLEAN.search(text):
        return text
    return _CONTROL.sub(" ", _SURROGATE.sub("\ufffd", text))


class KeyConfigError(ValueError):
    """The configured key cannot verify tokens of the configured algorithm."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str
    username: str
    rooms: frozenset[str] | None  # None: any room

    def may_join(self, room_id: str) -> bool:
        return self.rooms is None or room_id in self.rooms


@dataclass(frozen=True, slots=True)
class _Config:
    """What a token is verified against; swapped whole by :meth:`TokenVerifier.reconfigure`."""

    key: Any
    decoder: jwt.PyJWT  # for this key only (see jwtdecode.py)
    algorithms: list[str]
    audience: str | None
    issuer: str | None
    options: Any
    key_option: str  # the option a backend's key must match, for the bad-signature message


def _configuration(settings: Settings) -> _Config:
    key = settings.jwt_public_key or settings.jwt_secret
    if not key:
        raise ValueError("no JWT secret or public key configured")
    prepared = prepare_key(settings.jwt_algorithm, key, public=bool(settings.jwt_public_key))
    return _Config(
        key=prepared,
        decoder=decoder_for(settings.jwt_algorithm, prepared),
        algorithms=[settings.jwt_algorithm],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        options={
            "require": ["exp", "sub"],
            "verify_aud": settings.jwt_audience is not None,
            "verify_iss": settings.jwt_issuer is not None,
        },
        key_option="--jwt-public-key" if settings.jwt_public_key else "--jwt-secret",
    )


def _unauthorized(detail: str) -> SignalError:
    return SignalError("UNAUTHORIZED", detail)


class TokenVerifier:
    """Turns a bearer token into an :class:`Identity` or raises UNAUTHORIZED.

    Tokens it accepted are remembered in a :class:`VerifiedTokenCache` (by
    their SHA-256, until their ``exp``), so a reconnect or a resume storm
    does not decode every JWT again; :meth:`reconfigure` (a new key, audience
    or issuer) empties it.
    """

    def __init__(self, settings: Settings, leeway: float = 5.0, cache: VerifiedTokenCache | None = None) -> None:
        self._leeway = leeway
        self.cache = VerifiedTokenCache() if cache is None else cache
        self._config = _configuration(settings)

    def reconfigure(self, settings: Settings) -> None:
        """Verify with the key, algorithm, audience and issuer of ``settings`` from now on.

        The new key is prepared first: one that does not fit raises
        :class:`KeyConfigError` and the verifier keeps the old configuration
        and its cache. Otherwise the new configuration replaces the old one
        in a single assignment and every cached token is forgotten in the
        same step (no await between them), so no token verified under the
        old key is accepted without being verified again.
        """
        config = _configuration(settings)
        self._config = config
        self.cache.clear()

    def verify(self, token: str | None) -> Identity:
        """Verify ``token`` and read its claims (from the cache when it was verified recently).

        Raises:
            SignalError: ``UNAUTHORIZED`` with a client-safe reason.
        """
        if not token:
            raise _unauthorized("a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("token is too long")
        now = time.time()  # the wall clock PyJWT checks exp, nbf and iat against
        cache = self.cache
        key = token_digest(token)
        identity = cache.get(token, now, key)
        if identity is not None:
            return identity
        claims = self._decode(token)
        identity = _identity(claims)
        # PyJWT has checked that these convert with int(); compare as it does.
        not_before = max(int(claims.get("nbf", 0)), int(claims.get("iat", 0)))
        cache.put(token, identity, not_before, int(claims["exp"]), now, key)
        return identity

    def verify_admin(self, token: str | None) -> Identity:
        """Verify ``token`` exactly as :meth:`verify` does, then require the admin grant.

        Never from the cache: it holds identities, not the admin claim (and the
        room service API is not called per message).

        Raises:
            SignalError: ``UNAUTHORIZED`` (no valid token) or ``FORBIDDEN`` (valid, but
            no ``"admin": true`` claim: a participant's token).
        """
        if not token:
            raise _unauthorized("a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("token is too long")
        claims = self._decode(token)
        identity = _identity(claims)
        if claims.get("admin") is not True:
            raise SignalError("FORBIDDEN", "this token has no admin grant")
        return identity

    def _decode(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token`` (signature, algorithm, expiry, audience, issuer)."""
        config = self._config
        try:
            claims: dict[str, Any] = config.decoder.decode(
                token,
                config.key,
                algorithms=config.algorithms,
                audience=config.audience,
                issuer=config.issuer,
                leeway=self._leeway,
                options=config.options,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("token has expired") from None
        except jwt.InvalidSignatureError:
            # The usual cause is not an attacker but a backend signing with another key.
            raise _unauthorized(
                "invalid token (InvalidSignatureError): its signature does not match this server's key "
                f"(does the backend that issues tokens sign with the key given as {config.key_option}?)"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"invalid token ({type(exc).__name__})") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # The key was checked at start-up, so this is a token PyJWT could
            # not handle; the client still gets 401, never a 500.
            raise _unauthorized(f"invalid token ({type(exc).__name__})") from None
        return claims


def prepare_key(algorithm: str, key: str, *, public: bool) -> Any:
    """The key object PyJWT verifies with, or :class:`KeyConfigError` naming the option."""
    option = "--jwt-public-key" if public else "--jwt-secret"
    if not public:
        # Checked here too, not only by the option parser: embedders build
        # Settings directly. RFC 7518 3.2: at least the hash's length (32
        # bytes for HS256, 48 for HS384, 64 for HS512).
        length = len(key.encode("utf-8", "surrogatepass"))
        if length < MIN_SECRET_BYTES:
            raise KeyConfigError(f"{option}: must be at least {MIN_SECRET_BYTES} bytes")
        if algorithm.startswith("HS") and length < int(algorithm[2:]) // 8:
            raise KeyConfigError(f"{option}: must be at least {int(algorithm[2:]) // 8} bytes for {algorithm}")
    try:
        prepared = get_default_algorithms()[algorithm].prepare_key(key)
    except (jwt.PyJWTError, ValueError, TypeError, UnicodeError) as exc:
        raise KeyConfigError(f"{option}: not a usable {algorithm} key ({exc})") from None
    if public and not isinstance(prepared, (RSAPublicKey, EllipticCurvePublicKey)):
        # PyJWT verifies with a private key too, but a server that only
        # verifies must never hold one.
        raise KeyConfigError(f"{option}: this is a private key; give the server the public key only")
    if isinstance(prepared, RSAPublicKey) and prepared.key_size < MIN_RSA_BITS:
        # RFC 7518 3.3; PyJWT only warns, once per process, and verifies anyway.
        raise KeyConfigError(
            f"{option}: a {prepared.key_size}-bit RSA key; {algorithm} needs at least {MIN_RSA_BITS} bits"
        )
    return prepared


def _identity(claims: dict[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_USER_ID_LENGTH:
        raise _unauthorized(f"'sub' must be 1-{MAX_USER_ID_LENGTH} characters")
    if _UNCLEAN.search(sub):
        raise _unauthorized("'sub' must not contain control characters or unpaired surrogates")
    username = sub
    for claim in _NAME_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str):
            value = clean_text(value).strip()[:MAX_USER_ID_LENGTH]
            if value:
                username = value
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


def mint_token_for(settings: Settings, sub: str, **claims: Any) -> str:
    """:func:`mint_token` with the settings' secret, algorithm, audience and issuer:
    a token the server configured by ``settings`` accepts."""
    return mint_token(
        settings.jwt_secret or "", sub, algorithm=settings.jwt_algorithm,
        audience=settings.jwt_audience, issuer=settings.jwt_issuer, **claims,
    )


def mint_token(
    secret: str,
    sub: str,
    *,
    name: str | None = None,
    ttl: int = 3600,
    rooms: Iterable[str] | None = None,
    algorithm: str = "HS256",
    now: float | None = None,
    admin: bool = False,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Sign a token for ``sub`` (used by ``signal-server token`` and dev mode).

    ``admin`` adds the admin grant (``"admin": true``) the room service API requires;
    ``audience`` and ``issuer`` are those the server is configured to require.
    """
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl}
    if name:
        claims["name"] = name
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if admin:
        claims["admin"] = True
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)
