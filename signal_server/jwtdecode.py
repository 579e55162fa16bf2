"""A PyJWT decoder for one configured key, without the work PyJWT repeats for every token.

A join with a fresh token spends about a quarter of its CPU in ``jwt.decode``,
and most of that is not cryptography but two things PyJWT redoes per token:

* An HMAC key is prepared again on every decode: PyJWT checks that the secret
  is not a PEM, SSH, DER or JWK key in disguise (an attempt to parse it as a
  DER public key and as a certificate, and as JSON). Our key is the same
  object every time and passed those very checks once, at start-up
  (``auth.prepare_key``), so the algorithm here returns that object as it is;
  any other key still goes through PyJWT's checks.
* Each base64url segment is checked byte by byte in a Python generator (the
  alphabet test of GHSA-hxm8-2xgr-2p9m). The same test as one regular
  expression accepts and refuses exactly the same segments.

Everything else is PyJWT's own: the algorithm allow-list, the signature, the
header checks, every claim. Both changes sit on PyJWT internals (the decoder's
``_jws``, ``PyJWS._decode_base64url_segment``); each is used only when those
look as expected and, for the segment check, when it agrees with PyJWT's own
on a set of probes at start-up. Otherwise the stock decoder is used: slower,
never looser.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm, get_default_algorithms
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

__all__ = ["decoder_for", "segment_check_agrees", "SEGMENT_PROBES"]

_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")

# Segments on which the segment check must agree with PyJWT's before it is used:
# padding (none, one, two, three, misplaced), lengths 0-5, characters outside the
# alphabet (standard base64's + and /, white space, non-ASCII), non-canonical encodings.
SEGMENT_PROBES: tuple[bytes, ...] = (
    b"", b"A", b"QQ", b"QUI", b"QUJD", b"QUJDRA", b"QQ==", b"QUI=", b"QQ=", b"Q===", b"QQ===", b"====",
    b"QR", b"QUJ", b"QUJDRB", b"Q=Q=", b"=QQ", b"QQ=A", b"+/+/", b"-_-_", b"QQ\n", b" QQ", b"Q\x00Q",
    b"Q\xc3\xa9Q", b"!!!!", b"QUJD.", b"eyJhbGciOiJIUzI1NiJ9",
)


class _SegmentJWS(PyJWS):
    """PyJWS with the base64url segment check done by a regular expression."""

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        # Trailing "=" (some issuers pad) only as much as base64 could, never
        # more than two; then nothing outside the URL-safe alphabet, and only
        # the one canonical encoding of the bytes it decodes to.
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if (
            padding > 2
            or (padding and len(segment) % 4)
            or len(stripped) % 4 == 1
            or not _BASE64URL.fullmatch(stripped)
        ):
            raise DecodeError(f"Invalid {name} padding")
        try:
            decoded = base64url_decode(stripped)
        except (TypeError, binascii.Error) as err:
            raise DecodeError(f"Invalid {name} padding") from err
        if base64url_encode(decoded) != stripped:
            raise DecodeError(f"Invalid {name} padding")
        return decoded


class _PreparedHMAC(HMACAlgorithm):
    """HMAC with its one key prepared (and its length judged) once, not per token."""

    def __init__(self, hash_alg: Any, key: bytes) -> None:
        super().__init__(hash_alg)
        self._key = key
        self._length_message = super().check_key_length(key)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._key:
            return key
        return super().prepare_key(key)

    def check_key_length(self, key: bytes) -> str | None:
        if key is self._key:
            return self._length_message
        return super().check_key_length(key)


def _outcome(check: Any, segment: bytes) -> bytes | None:
    try:
        return bytes(check(segment, "probe"))
    except DecodeError:
        return None


def segment_check_agrees() -> bool:
    """True when the regular-expression segment check decides every probe as PyJWT's own does."""
    stock = getattr(PyJWS, "_decode_base64url_segment", None)
    if stock is None:
        return False
    return all(
        _outcome(stock, probe) == _outcome(_SegmentJWS._decode_base64url_segment, probe) for probe in SEGMENT_PROBES
    )


def decoder_for(algorithm: str, key: Any) -> jwt.PyJWT:
    """A PyJWT decoder for tokens of ``algorithm`` signed with ``key`` (as ``auth.prepare_key`` made it).

    Its ``decode`` takes the same arguments as ``jwt.decode`` and must be passed
    this very ``key``; with another key it verifies as stock PyJWT does.
    """
    decoder = jwt.PyJWT()
    if not isinstance(getattr(decoder, "_jws", None), PyJWS):
        return decoder  # a PyJWT laid out otherwise: stock decoding
    jws: PyJWS = _SegmentJWS(algorithms=[algorithm]) if segment_check_agrees() else PyJWS(algorithms=[algorithm])
    stock = get_default_algorithms()[algorithm]
    if isinstance(stock, HMACAlgorithm) and isinstance(key, bytes):
        jws.unregister_algorithm(algorithm)
        jws.register_algorithm(algorithm, _PreparedHMAC(stock.hash_alg, key))
    decoder._jws = jws
    return decoder
