"""The WebSocket contract on one node: joining, stamping, routing, errors, close codes."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import jwt
from aiohttp import WSMsgType

from .conftest import TIMEOUT, Member, connector, join_all, make_token

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


async def test_room_state_lists_everyone_including_the_joiner(connect):
    """room_state has participants (self included), self, max_participants, grace, resumed."""
    alice = await connect("alice", name="Alice A.")
    bob_ws = await connect("bob", join=False, preferred_username="bobby")
    state = await bob_ws.expect("room_state")
    payload = state["payload"]
    assert payload["participants"] == [
        {"user_id": "alice", "username": "Alice A."},
        {"user_id": "bob", "username": "bobby"},
    ]
    assert payload["self"] == {"user_id": "bob", "username": "bobby"}
    assert payload["max_participants"] == 8
    assert payload["reconnect_grace"] == 20.0
    assert payload["resumed"] is False and "recovered" not in payload
    assert state["room_id"] == "room-1" and ISO_UTC.match(state["timestamp"])
    joined = await alice.expect("user_joined")
    assert joined["payload"] == {"user_id": "bob", "username": "bobby"}


async def test_display_name_claim_precedence(connect):
    """username, then name, then preferred_username, then sub."""
    member = await connect("u1", join=False, username="U", name="N", preferred_username="P")
    assert (await member.expect("room_state"))["payload"]["self"]["username"] == "U"
    member = await connect("u2", join=False, name="N", preferred_username="P")
    assert (await member.expect("room_state"))["payload"]["self"]["username"] == "N"
    member = await connect("u3", join=False)
    assert (await member.expect("room_state"))["payload"]["self"]["username"] == "u3"


async def test_clean_leave_tells_the_others(connect):
    """A close with no status code (the guide's disconnect(), wscat) is a leave."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.ws.close()
    left = await alice.expect("user_left")
    assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "left"}


async def test_envelope_is_stamped_and_spoofing_is_ignored(connect):
    """sender_id/room_id/timestamp come from the server; payload.sender_id is set."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.ws.send_str(
        json.dumps(
            {
                "type": "offer",
                "payload": {"type": "offer", "sdp": "v=0 x", "sender_id": "mallory", "extra": [1, {"k": 2}]},
                "sender_id": "mallory",
                "room_id": "other-room",
                "timestamp": "1999-01-01T00:00:00Z",
            }
        )
    )
    offer = await alice.expect("offer")
    assert offer["sender_id"] == "bob"
    assert offer["room_id"] == "room-1"
    assert offer["timestamp"] != "1999-01-01T00:00:00Z" and ISO_UTC.match(offer["timestamp"])
    assert offer["payload"] == {"type": "offer", "sdp": "v=0 x", "sender_id": "bob", "extra": [1, {"k": 2}]}


async def test_targeted_messages_reach_only_the_target(connect):
    """payload.target_user_id delivers to that participant alone; never echoed."""
    alice, bob, carol = await join_all(connect, "alice", "bob", "carol")
    await alice.send("answer", type="answer", sdp="ans", target_user_id="carol")
    answer = await carol.expect("answer")
    assert answer["payload"]["target_user_id"] == "carol" and answer["sender_id"] == "alice"
    # Bob got nothing: the next thing he sees is his own pong.
    await bob.send("ping")
    await bob.expect("pong")
    await alice.send("ping")
    await alice.expect("pong")  # no echo of the answer to alice either


async def test_broadcast_reaches_everyone_but_the_sender(connect):
    """Without a target, a message goes to every other participant."""
    alice, bob, carol = await join_all(connect, "alice", "bob", "carol")
    await alice.send("ice_candidate", candidate="candidate:1 1 udp 1 127.0.0.1 9 typ host", sdp_mid="0",
                     sdp_m_line_index=0)
    for member in (bob, carol):
        message = await member.expect("ice_candidate")
        assert message["payload"]["sender_id"] == "alice"
    await alice.send("ping")
    await alice.expect("pong")


async def test_end_of_candidates_and_null_fields_are_valid(connect):
    """An empty candidate (end of candidates) with null mid/index is relayed."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.send("ice_candidate", candidate="", sdp_mid=None, sdp_m_line_index=None)
    assert (await alice.expect("ice_candidate"))["payload"]["candidate"] == ""


async def test_order_of_a_thousand_messages_is_kept(app_client):
    """1,000 messages from one sender arrive in order (rate limit raised for the burst)."""
    connect = connector(await app_client(rate_limit=1e6, rate_burst=10**6))
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    for number in range(1000):
        await bob.offer(sdp=str(number))
    received = [int((await alice.expect("offer"))["payload"]["sdp"]) for _ in range(1000)]
    assert received == list(range(1000))


async def test_invalid_messages_get_non_fatal_errors(connect):
    """Bad JSON, bad shapes, unknown types, binary frames: an error, and the connection lives."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    cases = [
        ("not json", "INVALID_MESSAGE"),
        ("[1, 2]", "INVALID_MESSAGE"),
        ('{"type": 5}', "INVALID_MESSAGE"),
        ('{"type": "offer"}', "INVALID_MESSAGE"),
        ('{"type": "offer", "payload": {"type": "answer", "sdp": "x"}}', "INVALID_MESSAGE"),
        ('{"type": "offer", "payload": {"type": "offer", "sdp": 1}}', "INVALID_MESSAGE"),
        ('{"type": "ice_candidate", "payload": {"candidate": 1}}', "INVALID_MESSAGE"),
        ('{"type": "ice_candidate", "payload": {"candidate": "", "sdp_mid": 3}}', "INVALID_MESSAGE"),
        ('{"type": "ice_candidate", "payload": {"candidate": "", "sdp_m_line_index": "0"}}', "INVALID_MESSAGE"),
        ('{"type": "offer", "payload": {"type": "offer", "sdp": "x", "target_user_id": 7}}', "INVALID_MESSAGE"),
        ('{"type": "user_joined", "payload": {}}', "UNSUPPORTED_TYPE"),
        ('{"type": "room_state", "payload": {}}', "UNSUPPORTED_TYPE"),
        ('{"type": "offer", "payload": {"type": "offer", "sdp": "x", "target_user_id": "alice"}}', "INVALID_MESSAGE"),
        ('{"type": "offer", "payload": {"type": "offer", "sdp": "x", "target_user_id": "zed"}}', "TARGET_NOT_FOUND"),
    ]
    for text, code in cases:
        await alice.ws.send_str(text)
        await alice.expect_error(code)
    await alice.ws.send_bytes(b"\x00\x01")
    await alice.expect_error("INVALID_MESSAGE")
    nested: dict[str, Any] = {"type": "offer", "payload": {"type": "offer", "sdp": "x", "deep": []}}
    inner = nested["payload"]["deep"]
    for _ in range(40):
        inner.append([])
        inner = inner[0]
    await alice.ws.send_str(json.dumps(nested))
    await alice.expect_error("INVALID_MESSAGE")
    await alice.offer(sdp="still works")
    assert (await bob.expect("offer"))["payload"]["sdp"] == "still works"


async def test_targeting_a_live_peer_after_errors_still_works(connect):
    """TARGET_NOT_FOUND names the missing user and changes nothing else."""
    alice = await connect("alice")
    error = None
    await alice.offer(target_user_id="ghost")
    error = await alice.expect_error("TARGET_NOT_FOUND")
    assert "ghost" in error["payload"]["message"]


async def test_ping_gets_pong(connect):
    """Browsers cannot send ping frames; a ping message gets a pong message."""
    alice = await connect("alice")
    await alice.send("ping")
    pong = await alice.expect("pong")
    assert pong["room_id"] == "room-1"


async def test_bad_tokens_are_unauthorized_in_band(connect):
    """Missing, garbage, expired, wrongly signed, alg none: error UNAUTHORIZED then 4401."""
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", algorithm="none")
    bad = ("", "garbage", make_token("alice", ttl=-60), make_token("alice", secret="x" * 40), unsigned, "a" * 8100)
    for token in bad:
        member = await connect("alice", token=token, join=False)
        await member.expect_error("UNAUTHORIZED")
        await member.expect_close(4401)


async def test_oversized_token_is_refused_without_a_server_error(client):
    """A token over 8 KiB is a 4xx from the HTTP layer (line too long), never a 5xx."""
    response = await client.get(f"/webrtc/ws/room-1?token={'a' * 9000}")
    assert 400 <= response.status < 500


async def test_authorization_header_is_accepted(client):
    """Non-browser clients may send the token as a Bearer header instead."""
    ws = await client.ws_connect("/webrtc/ws/room-1", headers={"Authorization": f"Bearer {make_token('zoe')}"})
    member = Member(ws, "zoe")
    assert (await member.expect("room_state"))["payload"]["self"]["user_id"] == "zoe"


async def test_rooms_claim_restricts_rooms(connect):
    """A token with a rooms claim may join those rooms only (FORBIDDEN 4403)."""
    member = await connect("alice", room="other", join=False, rooms=["room-1"])
    await member.expect_error("FORBIDDEN")
    await member.expect_close(4403)
    allowed = await connect("alice", room="room-1", join=False, rooms=["room-1"])
    await allowed.expect("room_state")


async def test_invalid_room_ids(client):
    """Room ids outside 1-64 of A-Z a-z 0-9 . _ ~ - get INVALID_ROOM 4400."""
    connect = connector(client)
    for room in ("a" * 65, "bad%20room", "caf%C3%A9", "semi;colon"):
        member = await connect("alice", room=room, join=False)
        await member.expect_error("INVALID_ROOM")
        await member.expect_close(4400)
    # Tricks the router normalises never reach the handler and are not 5xx.
    for path in ("/webrtc/ws/", "/webrtc/ws/a/b", "/webrtc/ws/%2F"):
        response = await client.get(path)
        assert 400 <= response.status < 500, (path, response.status)


async def test_room_full(app_client):
    """The (max+1)th participant gets ROOM_FULL (message contains the code) and 4409."""
    client = await app_client(max_participants=2)
    connect = connector(client)
    await connect("alice")
    await connect("bob")
    carol = await connect("carol", join=False)
    error = await carol.expect_error("ROOM_FULL")
    assert "ROOM_FULL" in error["payload"]["message"] and "2 of 2" in error["payload"]["message"]
    await carol.expect_close(4409)


async def test_concurrent_joins_admit_exactly_the_maximum(app_client):
    """Thirty simultaneous joins into a room of five: five room_states, 25 ROOM_FULL."""
    client = await app_client(max_participants=5)
    connect = connector(client)
    members = await asyncio.gather(*(connect(f"user{i}", join=False) for i in range(30)))
    firsts = await asyncio.gather(*(member.recv() for member in members))
    kinds = [first["type"] for first in firsts]
    assert kinds.count("room_state") == 5
    assert [f["payload"]["code"] for f in firsts if f["type"] == "error"] == ["ROOM_FULL"] * 25


async def test_session_takeover(connect):
    """A second connection of the same user replaces the first; others see nothing."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    bob2 = await connect("bob", join=False)
    state = await bob2.expect("room_state")
    assert state["payload"]["resumed"] is True
    assert [p["user_id"] for p in state["payload"]["participants"]] == ["alice", "bob"]
    await bob.expect_error("SESSION_REPLACED")
    await bob.expect_close(4410)
    await alice.offer(sdp="to the new bob")
    assert (await bob2.expect("offer"))["payload"]["sdp"] == "to the new bob"
    await alice.send("ping")
    await alice.expect("pong")  # no user_left / user_joined was sent to alice


async def test_message_too_large_closes_with_1009(app_client):
    """A frame over --max-message-size closes the connection with 1009."""
    client = await app_client(max_message_size=2048)
    alice = await connector(client)("alice")
    await alice.offer(sdp="x" * 4096)
    await alice.expect_close(1009)


async def test_origin_allow_list(app_client):
    """An Origin outside --allowed-origin is FORBIDDEN; no Origin (non-browser) is fine."""
    client = await app_client(allowed_origins=("https://app.example",))
    connect = connector(client)
    evil = await connect("alice", join=False, headers={"Origin": "https://evil.example"})
    await evil.expect_error("FORBIDDEN")
    await evil.expect_close(4403)
    await connect("alice", headers={"Origin": "https://app.example"})
    await connect("bob")
    own = f"http://{client.server.host}:{client.server.port}"
    await connect("carol", headers={"Origin": own})  # same-origin pages need no listing


async def test_heartbeat_detects_a_silent_peer(app_client):
    """A client that never answers pings is dropped within twice the heartbeat."""
    client = await app_client(heartbeat=0.5, reconnect_grace=0.0)
    connect = connector(client)
    alice = await connect("alice")
    ws = await client.ws_connect(f"/webrtc/ws/room-1?token={make_token('mute')}", autoping=False)
    mute = Member(ws, "mute")
    await mute.expect("room_state")
    await alice.expect("user_joined")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Reading keeps the socket open but autoping=False means no pong is ever sent.
    left = await alice.expect("user_left")
    assert left["payload"]["user_id"] == "mute"
    assert loop.time() - started <= 2 * 0.5 + 0.5
    message = await asyncio.wait_for(ws.receive(), TIMEOUT)
    while message.type in (WSMsgType.PING, WSMsgType.TEXT):
        message = await asyncio.wait_for(ws.receive(), TIMEOUT)
    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)


async def test_broadcast_encodes_once_for_all_recipients(app_client, monkeypatch):
    """Fan-out serialises the envelope once, not once per recipient."""
    import signal_server.hub as hub_module
    from signal_server import protocol

    calls = []
    real = protocol.encode_envelope

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(hub_module, "encode_envelope", counting)
    connect = connector(await app_client())
    members = await join_all(connect, *(f"user{i}" for i in range(5)))
    await members[0].offer(sdp="fan-out")
    for member in members[1:]:
        assert (await member.expect("offer"))["payload"]["sdp"] == "fan-out"
    assert calls == ["offer"]


async def test_client_ping_frames_get_pong_frames(client):
    """WebSocket-level pings from non-browser clients are answered (autoping is ours)."""
    ws = await client.ws_connect(f"/webrtc/ws/room-1?token={make_token('alice')}", autoping=False)
    await Member(ws, "alice").expect("room_state")
    await ws.ping(b"are you there")
    message = await asyncio.wait_for(ws.receive(), TIMEOUT)
    assert message.type is WSMsgType.PONG and message.data == b"are you there"
