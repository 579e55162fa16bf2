"""Reconnection with state recovery: held slots, kept messages, resume, grace expiry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from signal_server.context import SIGNALING
from signal_server.hub import Hub

from .conftest import TIMEOUT, Member, connector, make_token
from .rawws import RawWebSocket


class DropWatcher:
    """Wraps the real hub's drop() so a test can await "the server noticed"."""

    def __init__(self, hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dropped: asyncio.Queue[str] = asyncio.Queue()
        original = hub.drop

        async def drop(slot: Any, peer: Any) -> None:
            await original(slot, peer)
            self.dropped.put_nowait(slot.user_id)

        monkeypatch.setattr(hub, "drop", drop)

    async def wait(self, user: str) -> None:
        assert await asyncio.wait_for(self.dropped.get(), TIMEOUT) == user


@pytest.fixture
async def started(app_client, monkeypatch):
    """Start an app; return (client, connect, raw-connect, drop watcher)."""
    raws: list[RawWebSocket] = []

    async def start(**overrides: Any):
        client = await app_client(**overrides)
        hub = client.app[SIGNALING].hub
        watcher = DropWatcher(hub, monkeypatch)

        async def raw(user: str, room: str = "room-1") -> RawWebSocket:
            ws = await RawWebSocket.connect(
                client.server.host, client.server.port, f"/webrtc/ws/{room}?token={make_token(user)}"
            )
            raws.append(ws)
            await ws.expect("room_state")
            return ws

        return client, connector(client), raw, watcher

    yield start
    for ws in raws:
        await ws.aclose()


async def alice_and_dropped_bob(started, **overrides: Any) -> tuple[Any, Any, Member]:
    """Alice live, bob's connection cut without a close frame and noticed by the server."""
    client, connect, raw, watcher = await started(**overrides)
    alice = await connect("alice")
    bob = await raw("bob")
    await alice.expect("user_joined")
    bob.abort()
    await watcher.wait("bob")
    return client, connect, alice


async def no_more_messages(member: Member) -> None:
    """Prove nothing else is queued for ``member``: its next message is the pong."""
    await member.send("ping")
    await member.expect("pong")


async def test_abrupt_drop_holds_the_slot_and_resume_replays_in_order(started):
    """No user_left during the grace; resume gets room_state(resumed, recovered) then every kept message."""
    client, connect, alice = await alice_and_dropped_bob(started, reconnect_grace=30)
    await alice.offer(sdp="kept-1", target_user_id="bob")
    await alice.send("ice_candidate", candidate="kept-2", sdp_mid="0", sdp_m_line_index=0)  # broadcast
    await alice.offer(sdp="kept-3", target_user_id="bob")
    await no_more_messages(alice)  # and no user_left
    bob2 = await connect("bob", join=False)
    state = await bob2.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert [p["user_id"] for p in state["payload"]["participants"]] == ["alice", "bob"]
    replay = [await bob2.recv() for _ in range(3)]
    assert [m["type"] for m in replay] == ["offer", "ice_candidate", "offer"]
    assert [m["payload"].get("sdp") or m["payload"]["candidate"] for m in replay] == ["kept-1", "kept-2", "kept-3"]
    assert all(m["sender_id"] == "alice" for m in replay)
    await alice.offer(sdp="live")
    assert (await bob2.expect("offer"))["payload"]["sdp"] == "live"
    await no_more_messages(bob2)  # nothing duplicated
    await no_more_messages(alice)  # others saw no leave and no join


async def test_grace_expiry_is_a_timeout_leave_and_frees_the_slot(started):
    """After the grace the others get user_left(timeout), and a full room admits someone new."""
    client, connect, raw, watcher = await started(reconnect_grace=0.3, max_participants=2)
    alice = await connect("alice")
    bob = await raw("bob")
    await alice.expect("user_joined")
    carol = await connect("carol", join=False)
    await carol.expect_error("ROOM_FULL")  # bob's held slot still counts
    bob.abort()
    left = await alice.expect("user_left")
    assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "timeout"}
    await connect("carol")
    await alice.expect("user_joined")


async def test_overflowed_buffer_resumes_with_recovered_false_and_no_partial_replay(started):
    """Past the kept-message bound nothing is replayed and room_state says so."""
    client, connect, alice = await alice_and_dropped_bob(started, reconnect_grace=30, kept_messages=3)
    for number in range(5):
        await alice.offer(sdp=str(number), target_user_id="bob")
    await no_more_messages(alice)
    bob2 = await connect("bob", join=False)
    state = await bob2.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False
    await alice.offer(sdp="live")
    assert (await bob2.expect("offer"))["payload"]["sdp"] == "live"
    metrics = await (await client.get("/metrics")).text()
    assert "signal_kept_overflows_total 1.0" in metrics


async def test_kept_bytes_bound_also_overflows(started):
    """The byte bound applies as well as the count bound."""
    client, connect, alice = await alice_and_dropped_bob(started, reconnect_grace=30, kept_bytes=4096)
    await alice.offer(sdp="x" * 3000, target_user_id="bob")
    await alice.offer(sdp="y" * 3000, target_user_id="bob")
    await no_more_messages(alice)
    bob2 = await connect("bob", join=False)
    assert (await bob2.expect("room_state"))["payload"]["recovered"] is False


@pytest.mark.parametrize("code", [None, 1000, 1001])
async def test_clean_close_leaves_at_once(started, code):
    """A close frame with 1000, 1001 or no status code is a leave (reason left), grace or not."""
    client, connect, raw, watcher = await started(reconnect_grace=30)
    alice = await connect("alice")
    bob = await raw("bob")
    await alice.expect("user_joined")
    bob.close(code)
    left = await alice.expect("user_left")
    assert left["payload"]["reason"] == "left"


@pytest.mark.parametrize("code", [3000, 4000, 4999])
async def test_application_close_codes_hold_the_slot(started, code):
    """A close frame with 3000-4999 is not a leave: the slot is held and can be resumed."""
    client, connect, raw, watcher = await started(reconnect_grace=30)
    alice = await connect("alice")
    bob = await raw("bob")
    await alice.expect("user_joined")
    bob.close(code)
    await watcher.wait("bob")
    await alice.offer(sdp="while away", target_user_id="bob")
    await no_more_messages(alice)
    bob2 = await connect("bob", join=False)
    assert (await bob2.expect("room_state"))["payload"]["resumed"] is True
    assert (await bob2.expect("offer"))["payload"]["sdp"] == "while away"


async def test_target_in_grace_is_not_target_not_found(started):
    """A target whose slot is held gets the message kept, not TARGET_NOT_FOUND."""
    client, connect, alice = await alice_and_dropped_bob(started, reconnect_grace=30)
    await alice.offer(target_user_id="bob")
    await no_more_messages(alice)


async def test_takeover_keeps_the_slot_and_the_order(started):
    """Messages sent across a takeover reach old then new connection, each in order, none twice."""
    client, connect, raw, watcher = await started(reconnect_grace=30, rate_limit=1e6, rate_burst=10**6)
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    total = 300

    async def send_all() -> None:
        for number in range(total):
            await alice.offer(sdp=str(number), target_user_id="bob")

    sender = asyncio.create_task(send_all())
    bob2 = await connect("bob", join=False)
    await bob2.expect("room_state")
    await sender
    old: list[int] = []
    while True:
        message = await bob.recv()
        if message["type"] == "error":
            assert message["payload"]["code"] == "SESSION_REPLACED"
            break
        old.append(int(message["payload"]["sdp"]))
    new: list[int] = []
    while len(old) + len(new) < total:
        new.append(int((await bob2.expect("offer"))["payload"]["sdp"]))
    assert old + new == list(range(total))
    await no_more_messages(alice)


async def test_silent_peer_enters_the_grace_path_within_two_heartbeats(started):
    """A peer that stops answering pings is detected within heartbeat x 2 and held, not removed."""
    client, connect, raw, watcher = await started(heartbeat=0.5, reconnect_grace=30)
    alice = await connect("alice")
    await raw("bob")  # never read again: no pongs
    await alice.expect("user_joined")
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    reading = asyncio.create_task(alice.recv())  # alice keeps reading, so she answers pings
    await watcher.wait("bob")
    assert loop.time() - started_at <= 2 * 0.5 + 0.25
    await alice.offer(target_user_id="bob")
    await alice.send("ping")
    assert (await reading)["type"] == "pong"  # no user_left came first
    bob2 = await connect("bob", join=False)
    assert (await bob2.expect("room_state"))["payload"]["recovered"] is True
    await bob2.expect("offer")
