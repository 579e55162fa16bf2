"""The integration guide's client quirks, each pinned at the protocol level.

We never ship or run the guide's code; these tests send exactly what it sends
and check what it relies on.
"""

from __future__ import annotations

import json

from .conftest import make_token


async def test_answer_is_routed_by_payload_sender_id(connect):
    """The guide offers to the whole room and answers to payload.sender_id, not the envelope's."""
    alice = await connect("alice")
    bob = await connect("bob")  # sees two participants, so the guide's client offers
    await alice.expect("user_joined")
    # The guide's exact offer shape: no target, plus room_id and a client timestamp.
    await bob.ws.send_str(json.dumps({
        "type": "offer", "payload": {"type": "offer", "sdp": "bob-offer"},
        "room_id": "room-1", "timestamp": "2024-01-15T10:30:00Z",
    }))
    offer = await alice.expect("offer")
    target = offer["payload"]["sender_id"]  # handleOffer(payload) reads payload.sender_id
    assert target == "bob"
    await alice.ws.send_str(json.dumps({
        "type": "answer", "payload": {"type": "answer", "sdp": "alice-answer", "target_user_id": target},
        "room_id": "room-1", "timestamp": "2024-01-15T10:30:01Z",
    }))
    answer = await bob.expect("answer")
    assert answer["payload"]["sdp"] == "alice-answer" and answer["sender_id"] == "alice"


async def test_room_state_counts_the_joiner(connect):
    """The guide offers when participants.length > 1, so the list must include the joiner."""
    await connect("alice")
    bob = await connect("bob", join=False)
    participants = (await bob.expect("room_state"))["payload"]["participants"]
    assert len(participants) == 2 and {"user_id": "bob", "username": "bob"} in participants


async def test_snake_case_candidates_with_guide_field_names(connect):
    """The guide sends candidate/sdp_mid/sdp_m_line_index and reads the same names back."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.send("ice_candidate", candidate="candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host",
                   sdp_mid="0", sdp_m_line_index=0)
    payload = (await alice.expect("ice_candidate"))["payload"]
    assert (payload["candidate"], payload["sdp_mid"], payload["sdp_m_line_index"]) == (
        "candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", "0", 0)


async def test_error_messages_contain_their_codes(app_client):
    """onError gets payload.message only; the guide tests includes('ROOM_FULL'/'UNAUTHORIZED')."""
    from .conftest import connector

    connect = connector(await app_client(max_participants=1))
    await connect("alice")
    full = await connect("bob", join=False)
    assert "ROOM_FULL" in (await full.expect("error"))["payload"]["message"]
    expired = await connect("carol", room="other", join=False, token=make_token("carol", ttl=-60))
    assert "UNAUTHORIZED" in (await expired.expect("error"))["payload"]["message"]


async def test_config_can_be_passed_straight_to_rtcpeerconnection(app_client):
    """The guide passes the response to new RTCPeerConnection(config): camelCase keys must be there."""
    client = await app_client(stun_urls=("stun:stun.example:3478",))
    body = await (await client.get("/webrtc/config", headers={"Authorization": f"Bearer {make_token()}"})).json()
    assert body["iceServers"] == [{"urls": ["stun:stun.example:3478"]}]
    assert (body["iceTransportPolicy"], body["bundlePolicy"], body["rtcpMuxPolicy"]) == ("all", "balanced", "require")
    assert body["ice_servers"] == body["iceServers"]  # and the guide's own interface still type-checks


async def test_disconnect_without_a_code_is_a_leave(connect):
    """The guide's disconnect() calls ws.close() with no code: the others see user_left at once."""
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.ws.close()
    assert (await alice.expect("user_left"))["payload"]["reason"] == "left"
