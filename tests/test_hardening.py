"""Regression tests for the adversarial review of the single node, against a real server on loopback.

Each test here failed before its fix: a display name that poisoned a room,
forwarded addresses a client could choose, ``recovered: true`` after lost
frames, refused sockets lingering outside every limit, unsolicited pongs
outside the rate limit, the same-origin check that ignored the scheme, held
slots outside the connection limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from aiohttp import WSMsgType

from signal_server.context import SIGNALING

from .conftest import SECRET, TIMEOUT, Connect, Member, connector, fail_room_state_once, join_all, make_token
from .rawws import RawWebSocket
from .receipts import confirmations
from .stallproxy import StallProxy

OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x8, 0x9, 0xA


def watch_drops(client: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, asyncio.Event]:
    """An event per user, set once the hub holds that user's slot after a drop."""
    hub = client.app[SIGNALING].hub
    events: dict[str, asyncio.Event] = {}
    original = hub.drop

    async def drop(slot: Any, peer: Any) -> None:
        await original(slot, peer)
        events.setdefault(slot.user_id, asyncio.Event()).set()

    monkeypatch.setattr(hub, "drop", drop)
    return events


async def dropped(events: dict[str, asyncio.Event], user: str) -> None:
    await asyncio.wait_for(events.setdefault(user, asyncio.Event()).wait(), TIMEOUT)


@contextlib.asynccontextmanager
async def reading(member: Member) -> AsyncIterator[None]:
    """Keep ``member``'s client reading (it answers pings only while it reads); nothing else may arrive."""
    reader = asyncio.ensure_future(member.ws.receive())
    try:
        yield
    finally:
        assert not reader.done(), reader.result()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def raw(client: Any, user: str = "alice", room: str = "room-1", **kwargs: Any) -> Awaitable[RawWebSocket]:
    return RawWebSocket.connect(
        client.server.host, client.server.port, f"/webrtc/ws/{room}?token={make_token(user)}", **kwargs
    )


async def close_code(socket: RawWebSocket) -> int:
    """Read until the server's close frame and return its code."""
    while True:
        opcode, data = await socket.recv_frame()
        if opcode == OPCODE_CLOSE:
            code: int = struct.unpack("!H", data[:2])[0]
            return code


# ------------------------------------------------- 1. unencodable strings


async def test_a_display_name_cut_mid_emoji_joins_cleaned_and_the_room_stays_usable(app_client):
    """The name is cleaned (U+FFFD), everyone can still join, and leaving frees the room."""
    client = await app_client(max_participants=2)
    connect = connector(client)
    half_emoji = "Ann \ud83d"  # what JavaScript's slice leaves of "Ann 😀"
    ann = await connect("ann", username=half_emoji)
    bob = await connect("bob")
    assert (await ann.expect("user_joined"))["payload"] == {"user_id": "bob", "username": "bob"}
    await bob.ws.close()
    await ann.expect("user_left")
    await connect("carol")  # the room is not full of ghosts
    hub = client.app[SIGNALING].hub
    assert [slot.username for slot in hub.rooms["room-1"].slots.values()] == ["Ann \ufffd", "carol"]


async def test_room_state_lists_a_cleaned_name(app_client):
    client = await app_client(max_participants=2)
    connect = connector(client)
    await connect("ann", username="Ann \ud83d")
    ws = await client.ws_connect(f"/webrtc/ws/room-1?token={make_token('bob')}")
    state = await asyncio.wait_for(ws.receive_json(), TIMEOUT)
    assert state["payload"]["participants"] == [
        {"user_id": "ann", "username": "Ann \ufffd"}, {"user_id": "bob", "username": "bob"},
    ]
    await ws.close()


@pytest.mark.parametrize("sub", ["\ud83d", "ann\ud800", "ann\nINFO forged", "ann\x00"])
async def test_a_user_id_that_cannot_be_encoded_is_refused_and_leaves_nothing_behind(app_client, sub):
    client = await app_client(max_participants=1)
    connect = connector(client)
    intruder = await connect(token=make_token(sub), join=False)
    await intruder.expect_error("UNAUTHORIZED")
    await intruder.expect_close(4401)
    alone = await connect("bob")  # a room of one: a ghost would make it ROOM_FULL
    await alone.send("ping")
    await alone.expect("pong")
    assert list(client.app[SIGNALING].hub.rooms["room-1"].slots) == ["bob"]


async def test_config_refuses_an_unencodable_sub_with_turn_secrets(app_client):
    """The TURN username embeds the sub: it must be refused before, as a 401, never a 500."""
    client = await app_client(turn_urls=("turn:127.0.0.1:3478",), turn_secret="coturn-shared-secret")
    token = make_token("\udc00")
    response = await client.get("/webrtc/config", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 401
    assert (await response.json())["error"] == "UNAUTHORIZED"


async def test_a_join_that_fails_midway_leaves_the_room_as_it_was(app_client, monkeypatch, caplog):
    """All-or-nothing: a failure while encoding room_state inserts no slot, and the client gets 1011."""
    client = await app_client(max_participants=1)
    connect = connector(client)
    fail_room_state_once(monkeypatch)
    victim = await connect("ann", join=False)
    message = await asyncio.wait_for(victim.ws.receive(), TIMEOUT)
    assert message.type is WSMsgType.CLOSE and message.data == 1011, message
    assert "internal error" in caplog.text
    assert "room-1" not in client.app[SIGNALING].hub.rooms
    bob = await connect("bob")  # room of one: still free
    await bob.send("ping")
    await bob.expect("pong")


# ------------------------------------------------ 2. forwarded addresses


def forwarded_for(*lines: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", line) for line in lines]


async def test_a_client_line_before_the_proxy_line_does_not_choose_the_address(app_client):
    """HAProxy adds its own X-Forwarded-For line: the client's forged line must not win."""
    client = await app_client(trusted_proxies=("127.0.0.1",), max_connections_per_ip=1)
    first = await raw(client, "alice", headers=forwarded_for("6.6.6.6", "198.51.100.7"))
    second = await raw(client, "bob", headers=forwarded_for("7.7.7.7", "198.51.100.7"))
    try:
        await first.expect("room_state")
        error = await second.expect("error")
        assert error["payload"]["code"] == "TOO_MANY_CONNECTIONS"
        assert await close_code(second) == 4430
    finally:
        await first.aclose()
        await second.aclose()


async def test_hops_with_ports_are_distinct_clients_not_the_proxy(app_client):
    """``ip:port`` hops used to fall back to the proxy's address: every client in one bucket."""
    client = await app_client(trusted_proxies=("127.0.0.1",), max_connections_per_ip=1)
    sockets = [
        await raw(client, "alice", headers=forwarded_for("198.51.100.7:40001")),
        await raw(client, "bob", headers=forwarded_for("198.51.100.8:40001")),
        await raw(client, "carol", headers=forwarded_for("[2001:db8:1::7]:443")),
    ]
    try:
        for socket in sockets:
            await socket.expect("room_state")
    finally:
        for socket in sockets:
            await socket.aclose()


async def test_ipv6_clients_are_limited_per_64(app_client):
    """A /64 is one subscriber's allocation: fresh addresses in it are not fresh limits."""
    client = await app_client(trusted_proxies=("127.0.0.1",), max_connections_per_ip=1)
    first = await raw(client, "alice", headers=forwarded_for("2001:db8:1:2::1"))
    second = await raw(client, "bob", headers=forwarded_for("[2001:db8:1:2:ffff::9]:1234"))
    try:
        await first.expect("room_state")
        assert (await second.expect("error"))["payload"]["code"] == "TOO_MANY_CONNECTIONS"
    finally:
        await first.aclose()
        await second.aclose()


# ------------------------------------------------ 3. recovered: truthful


async def test_a_slow_consumer_resumes_with_recovered_false(app_client, monkeypatch):
    """Frames left in an aborted transport are lost: the resume must not claim a full recovery."""
    client = await app_client(max_send_buffer=64 * 1024, rate_limit=1e6, rate_burst=10**6, reconnect_grace=30,
        receive_rate=10**9, receive_burst=10**9,
    )
    drops = watch_drops(client, monkeypatch)
    alice = await connector(client)("alice")
    sloth = await raw(client, "sloth", read_buffer=4096)
    try:
        await sloth.expect("room_state")
        await alice.expect("user_joined")
        metrics = client.app[SIGNALING].metrics
        sent = 0
        while not metrics.limit_closes["slow_consumer"] and sent < 2000:  # bounded
            await alice.offer(sdp=f"{sent}:" + "s" * 30_000, target_user_id="sloth")
            await alice.send("ping")
            await alice.expect("pong")  # the server has routed the offer
            sent += 1
        assert metrics.limit_closes["slow_consumer"] == 1
        await dropped(drops, "sloth")
    finally:
        await sloth.aclose()
    again = await connector(client)("sloth", join=False)
    state = (await again.expect("room_state"))["payload"]
    assert state["resumed"] is True and state["recovered"] is False


async def test_frames_swallowed_by_a_dead_network_make_the_resume_unrecovered(app_client, monkeypatch):
    """The network goes silent (no FIN, no RST); frames sent meanwhile sit in dead buffers."""
    client = await app_client(heartbeat=0.5, reconnect_grace=30)
    drops = watch_drops(client, monkeypatch)
    connect = connector(client)
    alice = await connect("alice")
    proxy = await StallProxy(client.server.host, client.server.port).start()
    bob = await RawWebSocket.connect("127.0.0.1", proxy.port, f"/webrtc/ws/room-1?token={make_token('bob')}")
    try:
        await bob.expect("room_state")
        await alice.expect("user_joined")
        proxy.stall()
        for number in range(3):
            await alice.send("ice_candidate", candidate=f"candidate:{number}", target_user_id="bob")
        await dropped(drops, "bob")  # the keepalive found the silence
    finally:
        await bob.aclose()
        await proxy.close()
    again = await connect("bob", join=False)
    state = (await again.expect("room_state"))["payload"]
    assert state["resumed"] is True and state["recovered"] is False


async def test_frames_the_client_confirmed_still_resume_as_recovered(app_client, monkeypatch):
    """The other side of the coin: what the keepalive's pong confirmed was read, and is not lost."""
    client = await app_client(heartbeat=0.5, reconnect_grace=30)
    drops = watch_drops(client, monkeypatch)
    connect = connector(client)
    alice, bob = await join_all(connect, "alice", "bob")
    await alice.send("ice_candidate", candidate="candidate:0", target_user_id="bob")
    await bob.expect("ice_candidate")
    bob_peer = client.app[SIGNALING].hub.rooms["room-1"].slots["bob"].peer
    # The sweep pings bob for the unconfirmed frame; aiohttp's client answers
    # while it reads, as a browser always does.
    async with reading(bob):
        await asyncio.wait_for(confirmations(monkeypatch, bob_peer, 1).wait(), TIMEOUT)
    assert not bob_peer.unconfirmed
    bob.ws._response.connection.transport.abort()  # type: ignore[union-attr]
    await dropped(drops, "bob")
    await alice.send("ice_candidate", candidate="candidate:1", target_user_id="bob")
    await alice.send("ping")
    await alice.expect("pong")
    again = await connect("bob", join=False)
    state = (await again.expect("room_state"))["payload"]
    assert state["resumed"] is True and state["recovered"] is True
    assert (await again.expect("ice_candidate"))["payload"]["candidate"] == "candidate:1"


async def test_the_process_wide_kept_bound_marks_the_slot_that_passes_it(app_client, monkeypatch):
    """Held slots together keep at most --max-kept-bytes; the slot that would pass it keeps nothing."""
    client = await app_client(reconnect_grace=30, max_kept_bytes=4096)
    drops = watch_drops(client, monkeypatch)
    connect = connector(client)
    # Alone in their rooms, so nothing is pending when they drop: only the bound decides.
    for user, room in (("bob", "room-b"), ("carol", "room-c")):
        member = await connect(user, room)
        member.ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await dropped(drops, user)
    alice_b, alice_c = await connect("alice", "room-b"), await connect("alice", "room-c")
    await alice_b.send("offer", type="offer", sdp="b" * 1500, target_user_id="bob")  # fits
    await alice_c.send("offer", type="offer", sdp="c" * 3000, target_user_id="carol")  # would pass 4 KiB
    for alice in (alice_b, alice_c):
        await alice.send("ping")
        await alice.expect("pong")
    bob = await connect("bob", "room-b", join=False)
    assert (await bob.expect("room_state"))["payload"]["recovered"] is True
    await bob.expect("user_joined")
    assert (await bob.expect("offer"))["payload"]["sdp"] == "b" * 1500
    carol = await connect("carol", "room-c", join=False)
    assert (await carol.expect("room_state"))["payload"]["recovered"] is False
    assert client.app[SIGNALING].hub.kept_total == 0


# ------------------------------------------ 4. refused sockets are bounded


async def test_a_refused_client_that_never_answers_is_cut_off_within_about_a_second(app_client):
    """aiohttp waits 10 s for a close frame by default; a refusal must not hold a socket that long."""
    client = await app_client(max_connections=1)
    keeper = await connector(client)("alice")
    mute = await raw(client, "bob")  # never answers the close frame
    try:
        assert (await mute.expect("error"))["payload"]["code"] == "SERVER_BUSY"
        # Counted while it lingers: the gauge sees two sockets, not one.
        metrics = await (await client.get("/metrics")).text()
        assert "signal_connections 2.0" in metrics
        assert await close_code(mute) == 1013
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await mute.recv_frame(timeout=TIMEOUT)  # EOF or reset: the server let go
        assert loop.time() - started < 3.0
    finally:
        await mute.aclose()
    metrics = await (await client.get("/metrics")).text()
    assert "signal_connections 1.0" in metrics
    await keeper.ws.close()


async def test_refusals_by_an_address_limit_count_against_that_address_only(app_client):
    """A refused socket holds a descriptor while it lingers; one address's refusals must not fill the process."""
    client = await app_client(max_connections=2, max_connections_per_ip=1)
    keeper = await connector(client)("alice")
    mute = await raw(client, "bob")
    try:
        assert (await mute.expect("error"))["payload"]["code"] == "TOO_MANY_CONNECTIONS"
        # While it lingers, its own address stays over its limit ...
        again = await raw(client, "carol")
        # ... and another address still finds the process with room.
        other = await raw(client, "dave", local_host="127.0.0.2")
        try:
            assert (await again.expect("error"))["payload"]["code"] == "TOO_MANY_CONNECTIONS"
            await other.expect("room_state")
        finally:
            await again.aclose()
            await other.aclose()
    finally:
        await mute.aclose()
    await keeper.ws.close()


# ---------------------------------------------------- 5. every frame type


async def test_unsolicited_pongs_are_rate_limited(app_client):
    """Two million pongs used to cost seconds of CPU with no close; now they count like messages."""
    client = await app_client(rate_limit=10, rate_burst=20)
    flooder = await raw(client, "mallory")
    try:
        await flooder.expect("room_state")
        for _ in range(300):  # bounded: 100 dropped within 10 s closes
            flooder.send_frame(OPCODE_PONG, b"x")
        await flooder.writer.drain()
        assert await close_code(flooder) == 4429
    finally:
        await flooder.aclose()


async def test_a_pong_answering_our_ping_is_free(app_client, monkeypatch):
    """Keepalive pongs must never count: a quiet client answering pings is not a flooder."""
    client = await app_client(rate_limit=0.1, rate_burst=1, heartbeat=0.5)
    quiet = await connector(client)("quiet")
    peer = next(iter(client.app[SIGNALING].peers))
    async with reading(quiet):
        await asyncio.wait_for(confirmations(monkeypatch, peer, 3).wait(), TIMEOUT)
    await quiet.send("ping")  # the one token of its burst is still there
    await quiet.expect("pong")
    assert client.app[SIGNALING].metrics.rate_limited == 0


@pytest.mark.parametrize("opcode", [0x1, 0x2, OPCODE_PING, OPCODE_PONG])
async def test_every_frame_type_counts_toward_the_rate(app_client, opcode):
    client = await app_client(rate_limit=10, rate_burst=20)
    flooder = await raw(client, "mallory")
    data = b'{"type":"ping"}' if opcode == 0x1 else b"x"
    try:
        await flooder.expect("room_state")
        for _ in range(300):
            flooder.send_frame(opcode, data)
        await flooder.writer.drain()
        assert await close_code(flooder) == 4429
    finally:
        await flooder.aclose()


# ------------------------------------------------------------- origins


async def test_same_origin_needs_the_same_scheme(app_client):
    """An http:// page on our host must not pass for the https:// deployment, nor the reverse."""
    client = await app_client(allowed_origins=("https://app.example",))
    connect = connector(client)
    here = f"{client.server.host}:{client.server.port}"
    ok = await connect("alice", headers={"Origin": f"http://{here}"})
    await ok.send("ping")
    await ok.expect("pong")
    wrong = await connect("bob", headers={"Origin": f"https://{here}"}, join=False)
    await wrong.expect_error("FORBIDDEN")


async def test_behind_a_trusted_tls_proxy_the_forwarded_scheme_counts(app_client):
    client = await app_client(allowed_origins=("https://app.example",), trusted_proxies=("127.0.0.1",))
    connect = connector(client)
    here = f"{client.server.host}:{client.server.port}"
    https = {"Origin": f"https://{here}", "X-Forwarded-Proto": "https"}
    ok = await connect("alice", headers=https)
    await ok.send("ping")
    await ok.expect("pong")
    plain = await connect("bob", headers={"Origin": f"http://{here}", "X-Forwarded-Proto": "https"}, join=False)
    await plain.expect_error("FORBIDDEN")


async def test_two_origin_headers_are_refused(app_client):
    client = await app_client(allowed_origins=("https://app.example",))
    socket = await raw(client, "alice", headers=[("Origin", "https://app.example"), ("Origin", "https://evil.example")])
    try:
        assert (await socket.expect("error"))["payload"]["code"] == "FORBIDDEN"
    finally:
        await socket.aclose()


# -------------------------------------------------------- held slots


async def test_held_slots_count_against_the_connection_limit(app_client, monkeypatch):
    """Each held slot keeps memory for the grace: together with live ones they stay under the limit."""
    client = await app_client(max_connections=2, reconnect_grace=30)
    drops = watch_drops(client, monkeypatch)
    connect: Connect = connector(client)
    alice = await connect("alice")
    alice.ws._response.connection.transport.abort()  # type: ignore[union-attr]
    await dropped(drops, "alice")
    await connect("bob")
    carol = await connect("carol", join=False)
    await carol.expect_error("SERVER_BUSY")
    await carol.expect_close(1013)
    again = await connect("alice", join=False)  # a resume always fits: it brings no new slot
    assert (await again.expect("room_state"))["payload"]["resumed"] is True



# ---------------------------------------------- found by the hostile review


@pytest.mark.parametrize("room", ["%2e", "%2e%2e", "%2E%2e"])
async def test_dot_rooms_are_invalid(app_client, room):
    """A browser would resolve ./.. in the path into another URL: such a room is unreachable for it."""
    client = await app_client()
    socket = await RawWebSocket.connect(
        client.server.host, client.server.port, f"/webrtc/ws/{room}?token={make_token('alice')}"
    )
    try:
        assert (await socket.expect("error"))["payload"]["code"] == "INVALID_ROOM"
    finally:
        await socket.aclose()


async def http_exchange(host: str, port: int, request: bytes) -> bytes:
    """Write ``request`` as is and read until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_head_request_cannot_upgrade_and_join(app_client):
    client = await app_client()
    answer = await http_exchange(
        client.server.host, client.server.port,
        f"HEAD /webrtc/ws/room-1?token={make_token('alice')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 405"), answer[:40]
    assert "room-1" not in client.app[SIGNALING].hub.rooms


async def test_pipelined_requests_get_one_answer_and_the_connection_closes(app_client):
    """A client that pipelines requests and never reads used to hold the socket and its send queue for ever."""
    client = await app_client()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await http_exchange(client.server.host, client.server.port, request * 3)
    assert answer.count(b"HTTP/1.1 200") == 1, answer
    assert b"Connection: close" in answer


async def test_endless_empty_continuation_frames_are_cut_off(app_client):
    """A message that never ends cost CPU without ever reaching the rate limit; every byte counts now."""
    client = await app_client(receive_rate=64 * 1024, receive_burst=256 * 1024)
    alice = await connector(client)("alice")
    flooder = await raw(client, "mallory")
    try:
        await flooder.expect("room_state")
        await alice.expect("user_joined")
        flooder.writer.write(bytes((0x01, 0x80 | 1)) + b"\0\0\0\0{")  # text, no FIN: a message begins
        empty_continuation = bytes((0x00, 0x80)) + b"\0\0\0\0"
        for _ in range(20):  # bounded: 20 x 60 KiB, well past the 256 KiB burst
            flooder.writer.write(empty_continuation * 10_000)
            await flooder.writer.drain()
        opcode, data = await flooder.recv_frame()
        assert opcode == 0x1 and b"RATE_LIMITED" in data, data
        assert await close_code(flooder) == 4429
    except ConnectionError:
        pytest.fail("reset before the error and close frame were read")
    finally:
        await flooder.aclose()
    assert client.app[SIGNALING].metrics.limit_closes["byte_rate"] == 1
    await alice.send("ping")  # the others are unaffected
    await alice.expect("pong")


async def test_pongs_to_a_clients_pings_obey_the_send_bound(app_client):
    """A client that pings and never reads grew our send buffer without limit; it is a slow consumer now."""
    client = await app_client(
        max_send_buffer=4096, kept_bytes=4096, rate_limit=1e6, rate_burst=10**6,
        receive_rate=10**9, receive_burst=10**9,
    )
    pinger = await raw(client, "mallory", read_buffer=4096)
    metrics = client.app[SIGNALING].metrics
    try:
        await pinger.expect("room_state")
        for _ in range(400):  # bounded: at most 400 x 1,000 pings of 125 bytes
            if metrics.limit_closes["slow_consumer"]:
                break
            for _ in range(1000):
                pinger.send_frame(OPCODE_PING, b"p" * 125)
            await pinger.writer.drain()
    except ConnectionError:
        pass  # cut off mid-flood: what we want
    finally:
        await pinger.aclose()
    assert metrics.limit_closes["slow_consumer"] == 1


async def test_a_swallowed_user_left_makes_the_resume_unrecovered(app_client, monkeypatch):
    """Joins and leaves are kept for a held slot, so a live one must confirm them too."""
    client = await app_client(heartbeat=0.5, reconnect_grace=30)
    drops = watch_drops(client, monkeypatch)
    connect = connector(client)
    bob, carol = await join_all(connect, "bob", "carol")
    proxy = await StallProxy(client.server.host, client.server.port).start()
    alice = await RawWebSocket.connect("127.0.0.1", proxy.port, f"/webrtc/ws/room-1?token={make_token('alice')}")
    try:
        await alice.expect("room_state")  # the last to join: nothing else is pending for her
        await bob.expect("user_joined")
        await carol.expect("user_joined")
        proxy.stall()
        await carol.ws.close()  # a clean leave: alice's user_left goes into a dead network
        await bob.expect("user_left")
        await dropped(drops, "alice")
    finally:
        await alice.aclose()
        await proxy.close()
    again = await connect("alice", join=False)
    state = (await again.expect("room_state"))["payload"]
    assert state["resumed"] is True and state["recovered"] is False
    assert [p["user_id"] for p in state["participants"]] == ["bob", "alice"]


async def test_dev_mode_answers_only_to_loopback_names(app_client):
    """DNS rebinding: a page on evil.example rebound to 127.0.0.1 must not fetch dev tokens."""
    client = await app_client(dev_mode=True)
    for name in ("evil.example", "127.evil.example", "127.0.0.1.nip.io", "localhost.evil.example"):
        rebound = await client.get("/dev/token?user=eve", headers={"Host": f"{name}:{client.server.port}"})
        assert rebound.status == 421, name
    for host in (f"127.0.0.1:{client.server.port}", f"localhost:{client.server.port}", "[::1]"):
        response = await client.get("/dev/token?user=alice", headers={"Host": host})
        assert response.status == 200, host


async def test_an_origin_with_two_ports_is_not_our_own(app_client):
    client = await app_client(allowed_origins=("https://app.example",))
    here = f"{client.server.host}:{client.server.port}"
    member = await connector(client)("alice", headers={"Origin": f"http://{here}:80"}, join=False)
    await member.expect_error("FORBIDDEN")


async def test_too_many_header_lines_are_refused_before_the_upgrade(start_server, unused_tcp_port):
    """A request that has not upgraded is counted by no limit, so what it can make us hold is bounded."""
    server = await start_server("--port", str(unused_tcp_port), env={"SIGNAL_JWT_SECRET": SECRET})
    await server.line_matching("listening on")
    padding = "".join(f"X-Pad-{n}: {'p' * 100}\r\n" for n in range(40))
    answer = await http_exchange(
        "127.0.0.1", unused_tcp_port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{padding}\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer[:40]
