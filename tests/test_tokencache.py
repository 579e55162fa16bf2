"""The verified-token cache: every claim it must respect, with a clock the test moves.

Pure logic, so the clock is a fake shared by the verifier and PyJWT (mocks only
for pure logic); the last tests go through a real server to show the limits
and the rooms claim still apply to a token served from the cache.
"""

from __future__ import annotations

import hashlib
import random
import string
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import jwt
import pytest

import signal_server.auth
from signal_server.auth import Identity, KeyConfigError, TokenVerifier
from signal_server.context import Signaling
from signal_server.errors import SignalError
from signal_server.tokencache import VerifiedTokenCache, token_digest

from .conftest import SECRET, connector, make_settings

OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
T0 = 1_900_000_000  # a fixed wall-clock second for the fake clock


class Clock:
    """The wall clock of both the verifier and PyJWT, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock(T0)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.fromtimestamp(fake.now, tz or UTC)

    monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenDatetime)
    monkeypatch.setattr(signal_server.auth, "time", SimpleNamespace(time=lambda: fake.now))
    yield fake


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT is asked to decode (a cache hit asks nothing)."""
    seen: list[str] = []
    real = jwt.PyJWT.decode

    def counting(self: jwt.PyJWT, token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(self, token, *args, **kwargs)

    monkeypatch.setattr(jwt.PyJWT, "decode", counting)
    return seen


def token(sub: str = "alice", *, secret: str = SECRET, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": sub, "iat": T0, "exp": T0 + 600, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def refused(verifier: TokenVerifier, bearer: str) -> str:
    with pytest.raises(SignalError) as caught:
        verifier.verify(bearer)
    assert caught.value.code == "UNAUTHORIZED"
    return caught.value.message


def test_a_token_verified_once_is_not_decoded_again(clock: Clock, decodes: list[str]) -> None:
    verifier = TokenVerifier(make_settings())
    bearer = token(name="Alice", rooms=["r1", "r2"])
    first = verifier.verify(bearer)
    again = verifier.verify(bearer)
    assert decodes == [bearer]
    assert again is first  # identical tokens give identical identities (rooms and name included)
    assert again.username == "Alice" and again.rooms == frozenset({"r1", "r2"})
    assert verifier.cache.hits == 1


def test_entries_are_keyed_by_the_sha256_of_the_whole_token(clock: Clock) -> None:
    verifier = TokenVerifier(make_settings())
    bearer = token()
    verifier.verify(bearer)
    keys = list(verifier.cache._entries)
    assert keys == [hashlib.sha256(bearer.encode()).digest()] == [token_digest(bearer)]
    stored = repr(verifier.cache._entries)
    for part in bearer.split("."):
        assert part not in stored  # nothing of the bearer credential is kept
    # A token that differs only in its signature's last character is another entry.
    tampered = bearer[:-1] + ("A" if bearer[-1] != "A" else "B")
    assert token_digest(tampered) != token_digest(bearer)
    refused(verifier, tampered)


def test_a_fresh_token_is_hashed_once(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The miss and the put share one SHA-256 (hashing a token costs as much as a fifth of the HMAC)."""
    verifier = TokenVerifier(make_settings())
    hashed: list[str] = []

    def counting(text: str) -> bytes:
        hashed.append(text)
        return token_digest(text)

    monkeypatch.setattr(signal_server.auth, "token_digest", counting)
    bearer = token()
    verifier.verify(bearer)
    assert hashed == [bearer] and len(verifier.cache) == 1
    verifier.verify(bearer)  # a hit: one more
    assert hashed == [bearer, bearer] and verifier.cache.hits == 1


def test_a_cached_entry_never_outlives_exp(clock: Clock, decodes: list[str]) -> None:
    verifier = TokenVerifier(make_settings())
    bearer = token(exp=T0 + 60)
    verifier.verify(bearer)
    clock.now = T0 + 59.9
    verifier.verify(bearer)
    assert len(decodes) == 1
    clock.now = T0 + 60  # exp: the cache no longer answers; the verifier (with its leeway) does
    verifier.verify(bearer)
    assert len(decodes) == 2
    assert len(verifier.cache) == 0  # accepted within the leeway only: not cached again
    clock.now = T0 + 66
    assert "expired" in refused(verifier, bearer)


def test_a_token_not_yet_valid_is_neither_cached_nor_served_early(clock: Clock, decodes: list[str]) -> None:
    verifier = TokenVerifier(make_settings())
    later = token(nbf=T0 + 100)
    refused(verifier, later)
    assert len(verifier.cache) == 0
    clock.now = T0 + 100
    verifier.verify(later)
    assert len(verifier.cache) == 1
    clock.now = T0 + 50  # the clock went back: the verifier refuses nbf in the future again
    refused(verifier, later)
    assert len(verifier.cache) == 0


def test_iat_in_the_future_is_not_served_from_the_cache(clock: Clock) -> None:
    verifier = TokenVerifier(make_settings())
    bearer = token(iat=T0 + 100)
    clock.now = T0 + 100
    verifier.verify(bearer)
    clock.now = T0 + 10
    refused(verifier, bearer)


def test_a_token_accepted_only_by_the_leeway_is_not_cached(clock: Clock) -> None:
    verifier = TokenVerifier(make_settings())
    verifier.verify(token(nbf=T0 + 3))  # within the 5 s leeway: accepted
    assert len(verifier.cache) == 0


@pytest.mark.parametrize(
    ("before", "after", "claims"),
    [
        ({"jwt_audience": "signal"}, {"jwt_audience": "other"}, {"aud": "signal"}),
        ({"jwt_issuer": "https://id.example"}, {"jwt_issuer": "https://evil.example"},
         {"iss": "https://id.example"}),
    ],
)
def test_a_change_of_audience_or_issuer_empties_the_cache(
    clock: Clock, before: dict[str, str], after: dict[str, str], claims: dict[str, str]
) -> None:
    verifier = TokenVerifier(make_settings(**before))
    bearer = token(**claims)
    verifier.verify(bearer)
    verifier.reconfigure(make_settings(**after))
    assert len(verifier.cache) == 0
    refused(verifier, bearer)


def test_key_rotation_empties_the_cache(clock: Clock) -> None:
    verifier = TokenVerifier(make_settings())
    old = token()
    verifier.verify(old)
    verifier.reconfigure(make_settings(jwt_secret=OTHER_SECRET))
    assert len(verifier.cache) == 0 and verifier.cache.size_bytes == 0
    refused(verifier, old)
    assert verifier.verify(token(secret=OTHER_SECRET)).user_id == "alice"


def test_a_rotation_to_an_unusable_key_keeps_the_old_key_and_cache(clock: Clock, decodes: list[str]) -> None:
    verifier = TokenVerifier(make_settings())
    bearer = token()
    verifier.verify(bearer)
    with pytest.raises(KeyConfigError):
        verifier.reconfigure(make_settings(jwt_secret="short"))
    verifier.verify(bearer)
    assert decodes == [bearer]


def test_garbage_and_refused_tokens_never_grow_the_cache(clock: Clock) -> None:
    verifier = TokenVerifier(make_settings())
    rng = random.Random(13)
    hostile = [
        "".join(rng.choices(string.ascii_letters + string.digits + "-_.", k=rng.randint(1, 400)))
        for _ in range(300)
    ]
    hostile += [token(sub=f"u{n}", secret=OTHER_SECRET) for n in range(50)]  # bad signature
    hostile += [token(sub=f"e{n}", exp=T0 - 60) for n in range(50)]  # expired
    hostile += [jwt.encode({"sub": "x", "exp": T0 + 60}, "", algorithm="none")]
    hostile += [token(sub="")]  # verified signature, refused claims
    for bearer in hostile:
        refused(verifier, bearer)
    assert len(verifier.cache) == 0 and verifier.cache.size_bytes == 0


def test_the_cache_is_bounded_in_entries_least_recently_used_out(clock: Clock, decodes: list[str]) -> None:
    verifier = TokenVerifier(make_settings(), cache=VerifiedTokenCache(max_entries=10))
    tokens = [token(sub=f"user{n}") for n in range(50)]
    for bearer in tokens[:10]:
        verifier.verify(bearer)
    verifier.verify(tokens[0])  # used again: now the most recent
    for bearer in tokens[10:]:
        verifier.verify(bearer)
        assert len(verifier.cache) <= 10
    decodes.clear()
    verifier.verify(tokens[-1])
    assert decodes == []
    verifier.verify(tokens[0])  # evicted long ago despite its reuse: decoded again
    assert decodes == [tokens[0]]


def test_the_cache_is_bounded_in_bytes_whatever_the_claims(clock: Clock) -> None:
    cache = VerifiedTokenCache(max_entries=1000, max_bytes=64 * 1024)
    verifier = TokenVerifier(make_settings(), cache=cache)
    for n in range(40):
        rooms = [f"room-{n}-{i:03d}" for i in range(300)]  # a large (signed) rooms claim
        verifier.verify(token(sub=f"user{n}", rooms=rooms))
        assert 0 < cache.size_bytes <= cache.max_bytes
    assert len(cache) < 40
    small = VerifiedTokenCache(max_bytes=4096)
    big = token(sub="big", rooms=[f"{i:020d}" for i in range(100)])  # one identity over the whole budget
    assert TokenVerifier(make_settings(), cache=small).verify(big).rooms
    assert len(small) == 0 and small.size_bytes == 0


def test_the_footprint_estimate_covers_what_an_entry_really_costs(clock: Clock) -> None:
    import tracemalloc

    verifier = TokenVerifier(make_settings())
    tokens = [token(sub=f"user{n:05d}", name=f"User {n}", rooms=[f"r{n}", f"s{n}"]) for n in range(500)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        identities = [verifier.verify(bearer) for bearer in tokens]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(identities) == 500
    assert verifier.cache.size_bytes >= after - before


@pytest.mark.parametrize(
    ("configured", "good", "bad"),
    [
        ({"jwt_audience": "signal"}, {"aud": "signal"}, [{"aud": "other"}, {}]),
        ({"jwt_issuer": "https://id.example"}, {"iss": "https://id.example"},
         [{"iss": "https://evil.example"}, {}]),
    ],
    ids=["aud", "iss"],
)
def test_the_audience_and_issuer_are_checked_before_anything_is_cached(
    clock: Clock, decodes: list[str], configured: dict[str, str], good: dict[str, str], bad: list[dict[str, str]]
) -> None:
    """A token for another audience or issuer (or none) is refused every time and never cached;
    the right one is cached and served."""
    verifier = TokenVerifier(make_settings(**configured))
    for claims in bad:
        wrong = token(**claims)
        refused(verifier, wrong)
        refused(verifier, wrong)
        assert decodes.count(wrong) == 2  # decoded (and refused) again: no entry to hit
    assert len(verifier.cache) == 0
    right = token(**good)
    verifier.verify(right)
    verifier.verify(right)
    assert decodes.count(right) == 1 and len(verifier.cache) == 1


def test_the_cache_itself_serves_only_inside_nbf_and_exp() -> None:
    """The pure cache, without a verifier: [not_before, expires), no leeway either side."""
    cache = VerifiedTokenCache()
    identity = Identity("alice", "Alice", None)
    token_now = "header.claims.signature"
    cache.put(token_now, identity, 100, 200, now=150)
    assert cache.get(token_now, 99.999) is None  # before nbf: not served, and forgotten
    assert len(cache) == 0
    cache.put(token_now, identity, 100, 200, now=100)
    assert cache.get(token_now, 100) is identity and cache.get(token_now, 199.999) is identity
    assert cache.get(token_now, 200) is None and len(cache) == 0  # exp itself is too late
    cache.put(token_now, identity, 100, 200, now=99)  # not valid yet at put time: never stored
    cache.put(token_now, identity, 100, 200, now=200)  # expired at put time: never stored
    assert len(cache) == 0 and cache.misses == 2 and cache.hits == 2


def test_a_key_change_flushes_the_cache_and_is_counted_in_the_metrics(clock: Clock) -> None:
    settings = make_settings()
    sig = Signaling(settings)
    sig.verifier.verify(token())
    sig.verifier.verify(token())
    text = sig.metrics.exposition().decode()
    assert "signal_token_cache_hits_total 1.0" in text and "signal_token_cache_misses_total 1.0" in text
    assert "signal_token_cache_entries 1.0" in text and "signal_token_cache_flushes_total 0.0" in text
    sig.verifier.reconfigure(make_settings(jwt_secret=OTHER_SECRET))
    text = sig.metrics.exposition().decode()
    assert "signal_token_cache_entries 0.0" in text and "signal_token_cache_bytes 0.0" in text
    assert "signal_token_cache_flushes_total 1.0" in text


# ---------------------------------------------------------- through a server


async def test_per_user_limits_apply_to_a_token_served_from_the_cache(app_client: Any) -> None:
    client = await app_client(max_connections_per_user=1)
    connect = connector(client)
    sig_token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    await connect("alice", room="r1", token=sig_token)
    second = await connect("alice", room="r2", token=sig_token, join=False)  # a cache hit
    await second.expect_error("TOO_MANY_CONNECTIONS")
    await second.expect_close(4430)


async def test_the_rooms_claim_applies_to_a_token_served_from_the_cache(app_client: Any) -> None:
    client = await app_client()
    connect = connector(client)
    limited = jwt.encode(
        {"sub": "bob", "exp": int(time.time()) + 600, "rooms": ["r1"]}, SECRET, algorithm="HS256"
    )
    await connect("bob", room="r1", token=limited)
    elsewhere = await connect("bob", room="r2", token=limited, join=False)
    await elsewhere.expect_error("FORBIDDEN")
