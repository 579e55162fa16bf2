"""Pure logic without a server: JWT verification, rate policy, client addresses, codec."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings as hypothesis_settings, strategies as st
from multidict import CIMultiDict

from signal_server.admission import ClientAddress, limit_key, parse_hop
from signal_server.auth import KeyConfigError, TokenVerifier, clean_text, mint_token
from signal_server.errors import SignalError
from signal_server.keepalive import sweep
from signal_server.logs import redact
from signal_server.peer import WebSocketPeer
from signal_server.protocol import RELAYED_TYPES, parse_client_message, utc_timestamp
from signal_server.ratelimit import MessageRateLimiter, TokenBucket, Verdict

from .conftest import SECRET, make_settings, make_token

# ----------------------------------------------------------------- JWT


def rsa_pair() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return key, public


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_rs256_tokens_verify_with_the_public_key() -> None:
    key, public = rsa_pair()
    verifier = TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=public, jwt_algorithm="RS256"))
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    assert verifier.verify(token).user_id == "alice"


def test_es256_tokens_verify_with_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    verifier = TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=public, jwt_algorithm="ES256"))
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert verifier.verify(token).user_id == "bob"


def test_key_confusion_hs256_signed_with_the_public_key_is_refused() -> None:
    """With RS256 configured, an HS256 token whose HMAC key is the public PEM must fail."""
    _, public = rsa_pair()
    verifier = TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=public, jwt_algorithm="RS256"))
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    signature = b64(hmac.new(public.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(SignalError) as caught:
        verifier.verify(f"{header}.{body}.{signature}")
    assert caught.value.code == "UNAUTHORIZED"


def test_alg_none_is_refused() -> None:
    verifier = TokenVerifier(make_settings())
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", algorithm="none")
    with pytest.raises(SignalError, match="UNAUTHORIZED"):
        verifier.verify(token)


def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = TokenVerifier(make_settings(jwt_audience="signal", jwt_issuer="https://id.example"))
    good = make_token("alice", aud="signal", iss="https://id.example")
    assert verifier.verify(good).user_id == "alice"
    bad_claims: list[dict[str, Any]] = [{"aud": "other", "iss": "https://id.example"}, {"aud": "signal"}, {}]
    for claims in bad_claims:
        with pytest.raises(SignalError, match="UNAUTHORIZED"):
            verifier.verify(make_token("alice", **claims))


def test_not_before_is_honoured() -> None:
    verifier = TokenVerifier(make_settings())
    with pytest.raises(SignalError, match="UNAUTHORIZED"):
        verifier.verify(make_token("alice", nbf=int(time.time()) + 3600))


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": ""},
        {"sub": "x" * 129},
        {"sub": 42},
        {"rooms": "room-1"},
        {"rooms": [1, 2]},
        {"sub": "half an emoji \ud83d"},
        {"sub": "\udc00"},
        {"sub": "alice\nINFO forged log line"},
        {"sub": "nul\x00"},
        {"sub": "line\u2028separator"},
        {"sub": "next\x85line"},
        {"sub": "bob\u202e"},
    ],
)
def test_bad_claims_are_unauthorized(claims: dict[str, Any]) -> None:
    now = int(time.time())
    body = {"sub": "alice", "exp": now + 60, **claims}
    with pytest.raises(SignalError, match="UNAUTHORIZED"):
        TokenVerifier(make_settings()).verify(jwt.encode(body, SECRET, algorithm="HS256"))


def test_display_names_that_cannot_be_encoded_are_cleaned() -> None:
    """A name cut mid-emoji by JavaScript's slice still joins, with U+FFFD in place of the half."""
    verifier = TokenVerifier(make_settings())
    identity = verifier.verify(make_token("alice", username="Ann \ud83d"))
    assert identity.username == "Ann \ufffd"
    assert verifier.verify(make_token("bob", name="Bo\nb\x00\x07")).username == "Bo b"
    assert verifier.verify(make_token("carol", username="\x00\x01")).username == "carol"  # nothing left: sub
    assert clean_text("plain 😀") == "plain 😀"
    # Direction overrides would make a name read as another on a page.
    assert verifier.verify(make_token("dave", name="Bob\u202egnp.exe")).username == "Bob gnp.exe"


@pytest.mark.parametrize(
    ("algorithm", "curve_or_rsa"),
    [("ES256", "rsa"), ("RS256", "p256"), ("ES256", "p384"), ("ES384", "p256")],
)
def test_a_key_that_does_not_fit_the_algorithm_fails_at_start(algorithm: str, curve_or_rsa: str) -> None:
    if curve_or_rsa == "rsa":
        _, public = rsa_pair()
    else:
        curve = ec.SECP256R1() if curve_or_rsa == "p256" else ec.SECP384R1()
        public = ec.generate_private_key(curve).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    with pytest.raises(KeyConfigError, match="--jwt-public-key"):
        TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=public, jwt_algorithm=algorithm))


def test_a_private_key_is_refused_where_the_public_key_belongs() -> None:
    """PyJWT verifies with a private key too; a server that only verifies must never hold one."""
    key, _ = rsa_pair()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(KeyConfigError, match="private key"):
        TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=private, jwt_algorithm="RS256"))


def test_short_hs256_secrets_are_refused_even_when_embedded() -> None:
    with pytest.raises(KeyConfigError, match="at least 32 bytes"):
        TokenVerifier(make_settings(jwt_secret="a"))
    TokenVerifier(make_settings(jwt_secret="é" * 16))  # 32 bytes of UTF-8


@pytest.mark.parametrize(("algorithm", "length"), [("HS384", 48), ("HS512", 64)])
def test_hmac_secrets_shorter_than_their_hash_are_refused(algorithm: str, length: int) -> None:
    """RFC 7518 3.2: an HMAC key at least as long as the hash; PyJWT warns below it on every start."""
    with pytest.raises(KeyConfigError, match=f"--jwt-secret: must be at least {length} bytes for {algorithm}"):
        TokenVerifier(make_settings(jwt_secret="k" * (length - 1), jwt_algorithm=algorithm))
    TokenVerifier(make_settings(jwt_secret="k" * length, jwt_algorithm=algorithm))


def test_rsa_keys_under_2048_bits_are_refused() -> None:
    """RFC 7518 3.3: RS256 needs a key of 2048 bits or more; PyJWT warns below it, we refuse at start."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(KeyConfigError, match="--jwt-public-key: a 1024-bit RSA key; RS256 needs at least 2048"):
        TokenVerifier(make_settings(jwt_secret=None, jwt_public_key=weak, jwt_algorithm="RS256"))


def test_missing_exp_is_unauthorized() -> None:
    with pytest.raises(SignalError, match="UNAUTHORIZED"):
        TokenVerifier(make_settings()).verify(jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"))


def test_minted_tokens_round_trip() -> None:
    identity = TokenVerifier(make_settings()).verify(mint_token(SECRET, "carol", name="Carol", rooms=["r"]))
    assert (identity.user_id, identity.username, identity.rooms) == ("carol", "Carol", frozenset({"r"}))


# ------------------------------------------------------------ rate policy


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert not bucket.take(0.4) and bucket.take(0.5)
    assert bucket.is_full(10.0)


def test_rate_policy_reports_once_a_second_and_closes_after_100_drops_in_10_s() -> None:
    limiter = MessageRateLimiter(rate=1, burst=1, now=0.0)
    assert limiter.check(0.0) is Verdict.ALLOW
    verdicts = [limiter.check(0.01 * i) for i in range(1, 100)]
    assert verdicts[0] is Verdict.DROP_AND_REPORT
    assert all(v is Verdict.DROP for v in verdicts[1:])  # within the same second: quiet drops
    assert limiter.check(0.999) is Verdict.CLOSE  # the 100th drop within 10 s


def test_rate_policy_closes_after_5_s_of_sustained_excess() -> None:
    limiter = MessageRateLimiter(rate=10, burst=1, now=0.0)
    verdicts = []
    now = 0.0
    while now < 6.0:  # 20 messages a second against a limit of 10: half are dropped, for 6 s
        verdicts.append(limiter.check(now))
        now += 0.05
    assert Verdict.CLOSE in verdicts
    close_at = verdicts.index(Verdict.CLOSE) * 0.05
    assert 5.0 <= close_at < 5.2


def test_a_quiet_second_ends_the_streak() -> None:
    limiter = MessageRateLimiter(rate=10, burst=1, now=0.0)
    for second in range(8):
        base = second * 2.0  # one second of mild excess, then a quiet second
        for step in range(11):
            assert limiter.check(base + step * 0.09) is not Verdict.CLOSE


# ----------------------------------------------------------- addresses


def forwarded(*lines: str, header: str = "X-Forwarded-For") -> CIMultiDict[str]:
    """Headers with one ``header`` line per argument, as a proxy chain sends them."""
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        headers.add(header, line)
    return headers


def test_forwarded_for_walks_from_the_right_past_trusted_hops() -> None:
    address = ClientAddress(["10.0.0.0/8", "127.0.0.1"])
    headers = forwarded("203.0.113.5, 198.51.100.7, 10.1.2.3")
    assert address("127.0.0.1", headers) == "198.51.100.7"
    assert address("192.0.2.1", headers) == "192.0.2.1"  # an untrusted peer's header is ignored
    assert address("127.0.0.1", forwarded()) == "127.0.0.1"
    assert ClientAddress([])("::1", headers) == "::/64"  # IPv6 is keyed on its /64


def test_forwarded_for_reads_every_header_line_as_one_list() -> None:
    """HAProxy's option forwardfor appends a line: the client's own line must not win."""
    address = ClientAddress(["127.0.0.1"])
    assert address("127.0.0.1", forwarded("6.6.6.6", "198.51.100.7")) == "198.51.100.7"
    assert address("127.0.0.1", forwarded("6.6.6.6, 7.7.7.7", "198.51.100.7, ")) == "198.51.100.7"


def test_forwarded_hops_with_ports_and_brackets_are_read() -> None:
    address = ClientAddress(["127.0.0.1", "::1"])
    assert address("127.0.0.1", forwarded("198.51.100.7:51234")) == "198.51.100.7"
    assert address("127.0.0.1", forwarded("[2001:db8:1:2::7]:443")) == "2001:db8:1:2::/64"
    assert address("127.0.0.1", forwarded("[2001:db8:1:2::7]")) == "2001:db8:1:2::/64"
    assert address("::1", forwarded("::ffff:198.51.100.7")) == "198.51.100.7"  # IPv4-mapped is IPv4


def test_an_unreadable_hop_is_the_untrusted_end() -> None:
    """Garbage never becomes a key of its own: the nearest proxy answers for the client."""
    address = ClientAddress(["10.0.0.0/8", "127.0.0.1"])
    assert address("127.0.0.1", forwarded("not-an-ip")) == "127.0.0.1"
    assert address("127.0.0.1", forwarded("198.51.100.7, unknown, 10.0.0.9")) == "10.0.0.9"
    for garbage in ("1.2.3.4:", "1.2.3.4:http", "[::1", "[::1]x", "", " , ,"):
        assert address("127.0.0.1", forwarded(garbage)) == "127.0.0.1", garbage


def test_ipv6_clients_share_their_64() -> None:
    """A /64 is one subscriber: walking through it must not mint fresh limits."""
    keys = {limit_key(parse_hop(f"2001:db8:aa:bb::{n:x}")) for n in range(1, 200)}  # type: ignore[arg-type]
    assert keys == {"2001:db8:aa:bb::/64"}
    assert limit_key(parse_hop("2001:db8:aa:bc::1")) != "2001:db8:aa:bb::/64"  # type: ignore[arg-type]


def test_forwarded_proto_is_believed_only_from_a_trusted_proxy() -> None:
    address = ClientAddress(["127.0.0.1"])
    assert address.scheme("127.0.0.1", forwarded("https", header="X-Forwarded-Proto"), "http") == "https"
    assert address.scheme("198.51.100.7", forwarded("https", header="X-Forwarded-Proto"), "http") == "http"
    assert address.scheme("127.0.0.1", forwarded("gopher", header="X-Forwarded-Proto"), "http") == "http"


# ------------------------------------------------------------- log lines


@pytest.mark.parametrize(
    "line",
    [
        "GET /webrtc/ws/demo?token=eyJhbGciOi.abc.def HTTP/1.1",
        "GET /webrtc/ws/demo?%74oken=eyJhbGciOi.abc.def HTTP/1.1",
        "GET /webrtc/ws/demo?t%6Fk%65n=eyJhbGciOi.abc.def HTTP/1.1",
        "GET /webrtc/ws/demo?x=1&TOKEN=eyJhbGciOi.abc.def&y=2 HTTP/1.1",
        "GET /webrtc/ws/demo?token=eyJhbGciOi.abc;def HTTP/1.1",
        'GET /webrtc/ws/demo?%2574oken=eyJhbGciOi.abc.def"',
    ],
)
def test_every_spelling_of_the_token_parameter_is_redacted(line: str) -> None:
    redacted = redact(line)
    assert "eyJhbGciOi" not in redacted and "abc" not in redacted, redacted
    assert "[redacted]" in redacted


def test_other_parameters_survive_redaction() -> None:
    assert redact("GET /x?room=a&tokens=b&mytoken=c HTTP/1.1") == "GET /x?room=a&tokens=b&mytoken=c HTTP/1.1"


# ----------------------------------------------------------------- codec


def test_timestamps_are_iso_utc_with_milliseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())


NON_FATAL = {"INVALID_MESSAGE", "UNSUPPORTED_TYPE"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


def check_outcome(data: str | bytes) -> None:
    """The parser returns a valid message or raises a non-fatal SignalError; nothing else."""
    try:
        kind, payload, target = parse_client_message(data)
    except SignalError as error:
        assert error.code in NON_FATAL and error.close_code is None
        assert error.message.startswith(error.code)
        return
    assert kind == "ping" or kind in RELAYED_TYPES
    assert isinstance(payload, dict)
    assert target is None or (isinstance(target, str) and 0 < len(target) <= 128)
    if kind == "ice_candidate":
        assert isinstance(payload["candidate"], str)
    elif kind in ("offer", "answer"):
        assert payload["type"] == kind and isinstance(payload["sdp"], str)


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    check_outcome(data)


@hypothesis_settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_never_crashes_the_parser(value: Any) -> None:
    check_outcome(json.dumps(value))


message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "answer", "ice_candidate", "ping", "pong", "x"]) | json_values},
    optional={
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "type": st.sampled_from(["offer", "answer"]) | json_values,
                "sdp": st.text(max_size=20) | json_values,
                "candidate": st.text(max_size=20) | json_values,
                "sdp_mid": st.none() | st.text(max_size=3) | json_values,
                "sdp_m_line_index": st.none() | st.integers() | json_values,
                "target_user_id": st.none() | st.text(max_size=140) | json_values,
            },
        ) | json_values,
        "sender_id": json_values,
    },
)


@hypothesis_settings(max_examples=600, deadline=None)
@given(message_like)
def test_near_valid_messages_are_validated_exactly(value: Any) -> None:
    check_outcome(json.dumps(value))


def test_deeply_nested_json_is_a_clean_error() -> None:
    check_outcome("[" * 5000 + "]" * 5000)
    check_outcome('{"type":"offer","payload":' + '{"a":' * 2000 + "1" + "}" * 2000 + "}")


# ------------------------------------------------------------- keepalive


class FakePeer:
    def __init__(self, last_seen: float, unconfirmed: bool = False) -> None:
        self.last_seen = last_seen
        self.unconfirmed = unconfirmed
        self.pings = 0
        self.aborted = False

    def ping(self) -> None:
        self.pings += 1

    def abort(self) -> None:
        self.aborted = True


def test_sweep_pings_the_quiet_and_drops_the_silent() -> None:
    """Silent for half an interval: pinged; for one and a half: dropped; active: left alone."""
    active, quiet, silent = FakePeer(9.9), FakePeer(4.0), FakePeer(0.0)
    sweep([active, quiet, silent], now=10.0, interval=10.0)
    assert (active.pings, active.aborted) == (0, False)
    assert (quiet.pings, quiet.aborted) == (1, False)
    assert (silent.pings, silent.aborted) == (1, False)  # 10 s < 15 s: pinged, still time to answer
    sweep([silent], now=15.0, interval=10.0)
    assert silent.aborted


def test_sweep_pings_an_active_peer_with_unconfirmed_frames() -> None:
    """Its pong is what lets a later resume claim that nothing was lost."""
    busy = FakePeer(9.9, unconfirmed=True)
    sweep([busy], now=10.0, interval=10.0)
    assert (busy.pings, busy.aborted) == (1, False)


def test_a_dead_peer_is_found_within_two_intervals() -> None:
    """Sweeping every half interval, a peer gone quiet at t=0 is dropped by t=2 intervals."""
    peer = FakePeer(0.0)
    now = 0.37  # any phase of the sweep relative to the silence
    while not peer.aborted:
        sweep([peer], now=now, interval=1.0)
        now += 0.5
    assert now - 0.5 <= 2.0


# ------------------------------------------------------------ delivery receipts


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


class FakeResponse:
    closed = False


def pending(peer: WebSocketPeer) -> bool:
    """Relayed frames not confirmed yet (a function: mypy would narrow the property across asserts)."""
    return peer.unconfirmed


def receipt_peer() -> tuple[WebSocketPeer, FakeTransport]:
    transport = FakeTransport()
    return WebSocketPeer(FakeResponse(), transport, "room", 1 << 20), transport  # type: ignore[arg-type]


def test_a_pong_confirms_only_the_count_its_ping_carried() -> None:
    peer, transport = receipt_peer()
    peer.send(b"{}")
    peer.ping()
    first = transport.written[-1][2:]  # the ping's payload: the relayed count
    peer.send(b"{}")
    peer.send(b"{}")
    assert not peer.take_pong(struct.pack("!Q", 3))  # a count we never sent: unsolicited
    assert pending(peer)
    assert peer.take_pong(first)
    assert pending(peer)  # 1 of 3 confirmed
    peer.ping()
    assert peer.take_pong(transport.written[-1][2:])
    assert not pending(peer) and not peer.lost
    assert not peer.take_pong(transport.written[-1][2:])  # answered already: a second one is unsolicited


def test_a_client_may_answer_only_the_latest_ping() -> None:
    """RFC 6455 allows answering the most recent ping only; the older ones are then settled."""
    peer, transport = receipt_peer()
    peer.send(b"{}")
    peer.ping()
    peer.send(b"{}")
    peer.ping()
    assert peer.take_pong(transport.written[-1][2:])
    assert not pending(peer)
    assert not peer.take_pong(transport.written[-3][2:])  # the skipped ping's pong, late: unsolicited
