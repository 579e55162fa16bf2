"""The decoder that skips PyJWT's per-token repeats: same verdicts as stock PyJWT, less work.

Pure logic: tokens made and checked in-process, PyJWT's own functions wrapped
only to count calls.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt
import jwt.algorithms
import jwt.utils
import jwt.warnings
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError

from signal_server.auth import TokenVerifier
from signal_server.errors import SignalError
from signal_server.jwtdecode import SEGMENT_PROBES, _SegmentJWS, decoder_for, segment_check_agrees

from .conftest import SECRET, make_settings

STOCK_SEGMENT = PyJWS._decode_base64url_segment


def verdict(check: Any, segment: bytes) -> bytes | str:
    try:
        return bytes(check(segment, "header"))
    except DecodeError as error:
        return f"refused: {error}"


def fresh(sub: str, secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


def hs384(sub: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # SECRET is short for HS384
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS384")


@pytest.mark.parametrize("segment", SEGMENT_PROBES)
def test_the_segment_check_decides_every_probe_as_pyjwt_does(segment: bytes) -> None:
    assert verdict(_SegmentJWS._decode_base64url_segment, segment) == verdict(STOCK_SEGMENT, segment)


@hypothesis_settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=12) | st.text("AQB_-+/=. \n\x00é", max_size=12).map(str.encode))
def test_the_segment_check_agrees_with_pyjwt_on_any_bytes(segment: bytes) -> None:
    assert verdict(_SegmentJWS._decode_base64url_segment, segment) == verdict(STOCK_SEGMENT, segment)


def test_the_hmac_key_is_not_checked_again_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT's HMAC prepare_key parses the secret as PEM, SSH, DER and JSON on every decode;
    our key passed those checks once, when the verifier was made."""
    verifier = TokenVerifier(make_settings())
    tokens = [fresh(f"user{n}") for n in range(3)] + [fresh("x")]  # signing prepares the key too
    checks: list[bytes] = []
    real = jwt.utils.is_pem_format

    def counting(key: bytes) -> bool:
        checks.append(key)
        return real(key)

    monkeypatch.setattr(jwt.algorithms, "is_pem_format", counting)
    for n in range(3):
        assert verifier.verify(tokens[n]).user_id == f"user{n}"
    assert checks == []
    # Stock PyJWT (what the verifier used before) checks the key on every decode.
    jwt.decode(tokens[3], SECRET, algorithms=["HS256"])
    assert len(checks) == 1


def test_another_key_is_still_checked_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(SECRET)
    decoder = decoder_for("HS256", prepared)
    token = fresh("alice")
    assert decoder.decode(token, prepared, algorithms=["HS256"])["sub"] == "alice"
    assert decoder.decode(token, SECRET, algorithms=["HS256"])["sub"] == "alice"  # an equal key, prepared anew
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    with pytest.raises(jwt.InvalidKeyError):
        decoder.decode(token, pem, algorithms=["HS256"])


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # signature
        lambda t: t.replace(".", ".!", 1),  # a character outside the alphabet
        lambda t: t.split(".")[0] + "===." + t.split(".", 1)[1],  # too much padding
        lambda t: fresh("alice", secret="another-secret-that-is-long-enough-for-hs256!"),  # another key
        lambda t: jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"),  # expired
        lambda t: hs384("alice"),  # an algorithm other than the configured one
    ],
)
def test_what_stock_pyjwt_refuses_is_refused(bad: Any) -> None:
    verifier = TokenVerifier(make_settings())
    token = bad(fresh("alice"))
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(token, SECRET, algorithms=["HS256"])
    with pytest.raises(SignalError) as caught:
        verifier.verify(token)
    assert caught.value.code == "UNAUTHORIZED"


def test_a_pyjwt_whose_segment_check_differs_gets_the_stock_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should PyJWT's check change (stricter, say), ours must not replace it."""

    def stricter(segment: bytes, name: str) -> bytes:
        if segment.endswith(b"="):
            raise DecodeError("no padding at all")
        return bytes(STOCK_SEGMENT(segment, name))

    assert segment_check_agrees()
    monkeypatch.setattr(PyJWS, "_decode_base64url_segment", staticmethod(stricter))
    assert not segment_check_agrees()
    decoder = decoder_for("HS256", SECRET.encode())
    assert type(decoder._jws) is PyJWS


def test_asymmetric_keys_keep_pyjwt_s_algorithm() -> None:
    decoder = decoder_for("RS256", object())
    assert type(decoder._jws.get_algorithm_by_name("RS256")) is jwt.algorithms.RSAAlgorithm
    assert decoder._jws.get_algorithms() == ["RS256"]
