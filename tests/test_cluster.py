"""Three real nodes on one real redis-server act as one signaling server.

Each test starts its own redis-server (no persistence) and node processes on
free loopback ports, with short node TTL and grace so that dead-node and
expiry paths finish in seconds. Every wait is on a message, a log line or a
keyspace notification, bounded by a timeout; what no event announces is asked
for through ``poll_until``, which says why. Where time itself is the scenario
(Redis stalled by DEBUG SLEEP, a node's loop blocked), the helpers say so:
``stall``, ``block_this_loop``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestClient

from signal_server.context import SIGNALING

from .cluster import Clients, Node, RedisServer, RefusingRedis, Sentinel, poll_until
from .conftest import COMMAND, SECRET, TIMEOUT, Member, connector, fail_room_state_once, make_token
from .rawws import RawWebSocket
from .stallproxy import StallProxy

GRACE = 2.0
NODE_TTL = 2.0

StartNodes = Callable[..., Awaitable[list[Node]]]
AppClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start_nodes(redis: RedisServer) -> AsyncIterator[StartNodes]:
    started: list[Node] = []

    async def start(
        count: int = 3, *extra: str, grace: float = GRACE, ttl: float = NODE_TTL, prefix: str = "n"
    ) -> list[Node]:
        args = [
            "--redis-url", redis.url, "--node-ttl", str(ttl), "--reconnect-grace", str(grace),
            "--heartbeat", "30", *extra,
        ]
        nodes = [Node(f"{prefix}{len(started) + i + 1}", args) for i in range(count)]
        started.extend(nodes)
        await asyncio.gather(*(node.start() for node in nodes))
        return nodes

    yield start
    for node in started:
        await node.kill()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    async with ClientSession() as session:
        yield Clients(session)


def users(state: dict[str, object]) -> list[str]:
    payload = state["payload"]
    assert isinstance(payload, dict)
    return [p["user_id"] for p in payload["participants"]]


async def relay_ids(member: Member, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        message = await member.expect("offer")
        ids.append(int(message["payload"]["sdp"]))
    return ids


async def test_rooms_span_nodes_with_relay_in_order(start_nodes: StartNodes, clients: Clients) -> None:
    """room_state lists every node's participants; joins, targeted and broadcast relay, leaves cross nodes."""
    n1, n2, n3 = await start_nodes(3)
    alice = await clients.connect(n1, "alice")
    bob_ws = await clients.connect(n2, "bob", join=False)
    state = await bob_ws.expect("room_state")
    assert users(state) == ["alice", "bob"]
    assert (await alice.expect("user_joined"))["payload"]["user_id"] == "bob"
    carol = await clients.connect(n3, "carol", join=False)
    assert users(await carol.expect("room_state")) == ["alice", "bob", "carol"]
    for member in (alice, bob_ws):
        assert (await member.expect("user_joined"))["payload"]["user_id"] == "carol"

    # Targeted, across nodes, in order.
    for i in range(50):
        await alice.offer(sdp=str(i), target_user_id="carol")
    assert await relay_ids(carol, 50) == list(range(50))
    # Broadcast: each other participant gets it once, in order; never the sender.
    for i in range(30):
        await bob_ws.offer(sdp=str(i))
    assert await relay_ids(alice, 30) == list(range(30))
    assert await relay_ids(carol, 30) == list(range(30))
    # Payload stamping survives the hop.
    await carol.send("ice_candidate", candidate="c", sdp_mid="0", sdp_m_line_index=0, target_user_id="alice")
    relayed = await alice.expect("ice_candidate")
    assert relayed["sender_id"] == "carol" and relayed["payload"]["sender_id"] == "carol"
    assert relayed["room_id"] == "room-1"
    # Unknown targets are still refused; known remote ones are not.
    await alice.offer(target_user_id="nobody")
    await alice.expect_error("TARGET_NOT_FOUND")

    await bob_ws.ws.close()
    for member in (alice, carol):
        left = await member.expect("user_left")
        assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "left"}
    await alice.offer(sdp="after", target_user_id="bob")
    await alice.expect_error("TARGET_NOT_FOUND")

    async def three_nodes() -> bool:
        return await n1.metric("signal_cluster_nodes") == 3

    # Polled: the gauge is n1's count from its last tick's reaper run, which announces nothing.
    await poll_until(three_nodes)
    assert await n1.metric("signal_redis_up") == 1
    assert await n1.metric("signal_cluster_messages_published_total") >= 50
    assert await n3.metric("signal_cluster_messages_received_total") >= 80


async def test_capacity_is_exact_across_nodes(start_nodes: StartNodes, clients: Clients) -> None:
    """Twelve users joining one room of 4 through three nodes at once: exactly 4 get in."""
    nodes = await start_nodes(3, "--max-participants", "4")

    async def attempt(i: int) -> bool:
        member = await clients.connect(nodes[i % 3], f"user{i}", join=False)
        first = await member.recv()
        if first["type"] == "room_state":
            return True
        assert first["payload"]["code"] == "ROOM_FULL", first
        await member.expect_close(4409)
        return False

    results = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert sum(results) == 4


async def test_takeover_across_nodes(start_nodes: StartNodes, clients: Clients) -> None:
    """The same user joining through another node takes the slot over; others see nothing."""
    n1, n2, n3 = await start_nodes(3)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n3, "bob")
    await alice.expect("user_joined")
    again = await clients.connect(n2, "alice", join=False)
    state = await again.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False
    assert users(state) == ["alice", "bob"]
    await alice.expect_error("SESSION_REPLACED")
    await alice.expect_close(4410)
    # bob saw neither a leave nor a join, and reaches alice on her new node.
    await bob.offer(sdp="hello", target_user_id="alice")
    assert (await again.expect("offer"))["payload"]["sdp"] == "hello"
    await again.offer(sdp="back", target_user_id="bob")
    assert (await bob.expect("offer"))["payload"]["sdp"] == "back"


async def raw_client(node: Node, user: str, room: str = "room-1") -> RawWebSocket:
    """A client that can vanish without a close frame (its slot is then held)."""
    raw = await RawWebSocket.connect("127.0.0.1", node.port, f"/webrtc/ws/{room}?token={make_token(user)}")
    await raw.expect("room_state")
    return raw


async def test_resume_on_another_node_replays_kept_messages(start_nodes: StartNodes, clients: Clients) -> None:
    n1, n2, n3 = await start_nodes(3, grace=10.0)
    bob = await clients.connect(n2, "bob")
    carol = await clients.connect(n1, "carol")
    await bob.expect("user_joined")
    # alice joins last, so nothing was sent to her that she had not confirmed
    # reading when she vanishes: her resume can be complete (recovered true).
    alice = await raw_client(n1, "alice")
    for member in (bob, carol):
        await member.expect("user_joined")
    alice.abort()
    await n1.line_matching(r"close room=room-1 user=alice clean=False")
    for i in range(10):
        await bob.offer(sdp=f"b{i}", target_user_id="alice")  # from another node
        await carol.offer(sdp=f"c{i}", target_user_id="alice")  # from alice's old node
    await bob.send("ping")
    await bob.expect("pong")
    # bob's pong says node 2 published his offers, not that node 1 has kept them yet: those
    # still on their way through node 1 are forwarded, and node 3 waits for them (hand-off).
    resumed = await clients.connect(n3, "alice", join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert users(state) == ["bob", "carol", "alice"]
    got = [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(20)]
    assert [s for s in got if s[0] == "b"] == [f"b{i}" for i in range(10)]
    assert [s for s in got if s[0] == "c"] == [f"c{i}" for i in range(10)]
    # Live traffic after the replay, and nothing duplicated.
    await bob.offer(sdp="live", target_user_id="alice")
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "live"
    await carol.offer(sdp="live2", target_user_id="alice")
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "live2"



def kept_key(room: str, user: str) -> str:
    """The Redis list of frames kept for ``user``'s held slot."""
    return f"sig:{{{room}}}:k:{user}"


def members_key(room: str) -> str:
    """The Redis hash of ``room``'s records, one per participant."""
    return f"sig:{{{room}}}:m"


async def kept_count(redis: RedisServer, room: str, user: str) -> int:
    return int(await redis.command("LLEN", kept_key(room, user)))


async def send_kept(redis: RedisServer, sender: Member, user: str) -> None:
    """``sender`` offers "kept" to held ``user``; returns once it is the one frame kept in Redis."""
    await sender.offer(sdp="kept", target_user_id=user)

    async def kept() -> bool:
        return await kept_count(redis, "room-1", user) == 1

    await redis.until(kept, kept_key("room-1", user))


async def quiet(member: Member) -> None:
    """Nothing else is queued for ``member``: a ping's pong comes next."""
    await member.send("ping")
    await member.expect("pong")


async def resume_incomplete(clients: Clients, node: Node, user: str = "alice") -> None:
    """``user`` resumes through ``node``: resumed, and told that messages were lost."""
    resumed = await clients.connect(node, user, join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False


async def test_unconfirmed_frames_make_a_resume_elsewhere_incomplete(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """A connection that vanished with a frame it never confirmed reading resumes, on any
    node, with recovered false: the hold carries that into Redis."""
    n1, n2 = await start_nodes(2, grace=10.0)
    alice = await raw_client(n1, "alice")
    await clients.connect(n2, "bob")
    await alice.expect("user_joined")  # read, but not confirmed (no keepalive ping yet)
    alice.abort()

    async def held_incomplete() -> bool:
        record = await redis.command("HGET", "sig:{room-1}:m", "alice")
        return bool(record) and json.loads(record)["h"] > 0 and json.loads(record)["o"] == 1

    await redis.until(held_incomplete, members_key("room-1"))
    await resume_incomplete(clients, n2)


async def test_resume_after_the_holding_node_is_killed(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """Kept messages live in Redis: they replay after the node that held the slot died."""
    n1, n2, n3 = await start_nodes(3, grace=10.0)
    bob = await clients.connect(n2, "bob")
    alice = await raw_client(n1, "alice")  # last: nothing unconfirmed when she vanishes
    await bob.expect("user_joined")
    alice.abort()
    await n1.line_matching(r"close room=room-1 user=alice clean=False")
    for i in range(5):
        await bob.offer(sdp=f"b{i}", target_user_id="alice")

    async def all_kept() -> bool:
        return await kept_count(redis, "room-1", "alice") == 5

    await redis.until(all_kept, kept_key("room-1", "alice"))
    await n1.kill()
    resumed = await clients.connect(n3, "alice", join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(5)] == [f"b{i}" for i in range(5)]
    await bob.offer(sdp="live", target_user_id="alice")
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "live"
    await quiet(bob)  # bob saw no leave and no join


async def test_dead_node_release_says_node_lost_once(start_nodes: StartNodes, clients: Clients) -> None:
    """A killed node's participants are held; those not back get user_left node_lost once, in TTL + grace."""
    n1, n2, n3 = await start_nodes(3)
    alice = await clients.connect(n1, "alice")
    dave = await clients.connect(n1, "dave")
    bob = await clients.connect(n2, "bob")
    carol = await clients.connect(n3, "carol")
    for member, count in ((alice, 3), (dave, 2), (bob, 1)):
        for _ in range(count):
            await member.expect("user_joined")
    loop = asyncio.get_running_loop()
    killed = loop.time()
    await n1.kill()
    # Found dead (by exactly one of the others), its participants held...
    found = [asyncio.ensure_future(node.line_matching(r"node n1 is gone", timeout=NODE_TTL + TIMEOUT))
             for node in (n2, n3)]
    _, pending = await asyncio.wait(found, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert loop.time() - killed <= NODE_TTL + 1.5
    # ...so dave resumes through another node within the grace: not a leave. What
    # the dead node had sent him was never confirmed, so it is not a complete resume.
    back = await clients.connect(n2, "dave", join=False)
    state = await back.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False
    for member in (bob, carol, back):
        left = await member.expect("user_left")
        assert left["payload"] == {"user_id": "alice", "username": "alice", "reason": "node_lost"}
    assert loop.time() - killed <= NODE_TTL + GRACE + 2.0
    for member in (bob, carol, back):
        await quiet(member)
    assert n2.count(r"node n1 is gone") + n3.count(r"node n1 is gone") == 1


async def expect_relay_back(sender: Member, receiver: Member, timeout: float = 5.0) -> None:
    """Cross-node relay works again: one of a bounded series of offers arrives, then one in order."""
    async with asyncio.timeout(timeout):
        for i in range(int(timeout / 0.2)):
            await sender.offer(sdp=f"probe{i}", target_user_id=receiver.user)
            try:
                message = await receiver.recv(timeout=0.2)
            except TimeoutError:
                continue
            if message["type"] == "offer":
                break
        else:
            raise AssertionError("relay did not come back")
    await sender.offer(sdp="after", target_user_id=receiver.user)
    while (message := await receiver.expect("offer"))["payload"]["sdp"] != "after":
        assert message["payload"]["sdp"].startswith("probe")


async def test_redis_outage_and_empty_restart(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """Redis down: same-node relay goes on, cross-node gets UNAVAILABLE, joins 1013, /readyz 503.
    Redis stays down until every node has failed to reconnect OUTAGE_ATTEMPTS times (their
    backoff has grown), then comes back empty: membership and capacity re-registered, relay
    back within 5 s."""
    n1, n2, n3 = await start_nodes(3, "--max-participants", "4", grace=30.0)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n1, "bob")
    carol = await clients.connect(n2, "carol")
    await alice.expect("user_joined")
    for _ in range(2):
        await (alice if _ else bob).expect("user_joined")
    loop = asyncio.get_running_loop()
    stopped = loop.time()
    await redis.stop()
    away = await RefusingRedis(redis.port).start()  # the outage: every reconnection fails, counted
    try:
        await asyncio.gather(*(node.wait_ready(False, timeout=2.5) for node in (n1, n2, n3)))
        assert loop.time() - stopped <= 2.5
        await outage_checks(n1, n3, alice, bob, clients)
        # The outage lasts a number of every node's failed reconnections (the scenario):
        # counted, so a loaded machine makes it longer in seconds, never shorter in retries.
        await away.failed([node.node_id for node in (n1, n2, n3)], OUTAGE_ATTEMPTS)
    finally:
        await away.close()
    await redis.start()  # empty: no persistence
    restarted = loop.time()
    try:
        await asyncio.gather(*(node.wait_ready(True, timeout=5.0) for node in (n1, n2, n3)))
    except AssertionError:
        for node in (n1, n2, n3):
            print(node.name, "".join(line for line in node.lines if "access" not in line)[-3000:])
        raise
    assert [await node.readyz() for node in (n1, n2, n3)] == [200] * 3
    left = await carol.expect("user_left")
    assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "left"}
    await expect_relay_back(alice, carol)
    await expect_relay_back(carol, alice)
    assert loop.time() - restarted <= 5.0 + 1.0
    # Membership and capacity as before: two more get in and see everyone, the next is refused.
    # (Join order after an empty restart is the order in which nodes re-registered.)
    dave = await clients.connect(n3, "dave", join=False)
    assert sorted(users(await dave.expect("room_state"))) == ["alice", "carol", "dave"]
    await clients.connect(n1, "erin")
    frank = await clients.connect(n2, "frank", join=False)
    await frank.expect_error("ROOM_FULL")
    for line in ("Redis unreachable", "Redis reachable"):
        assert 1 <= n1.count(line) <= 2, n1.lines[-30:]


# Failed reconnections per node that the outage above lasts: each node retries from a few
# loops (writer, subscriber), so their jittered backoff (0.1 s doubling to a 2 s cap) has
# doubled several times by then; with the old 5 s outage the nodes made about this many.
OUTAGE_ATTEMPTS = 12


async def outage_checks(n1: Node, n3: Node, alice: Member, bob: Member, clients: Clients) -> None:
    """What a node does while Redis is away: not ready, same-node relay goes on, cross-node
    relay says UNAVAILABLE (at most once a second), joins get 1013, a clean leave is heard
    on the same node at once."""
    assert await n1.readyz() == 503
    assert await n1.metric("signal_redis_up") == 0
    # Same node: unaffected.
    await alice.offer(sdp="local", target_user_id="bob")
    assert (await bob.expect("offer"))["payload"]["sdp"] == "local"
    # Cross node: UNAVAILABLE, non-fatal, at most once a second.
    await alice.offer(sdp="x1", target_user_id="carol")
    await alice.offer(sdp="x2", target_user_id="carol")
    error = await alice.expect_error("UNAVAILABLE")
    await quiet(alice)
    # A broadcast still reaches the same node, and reports the rest once.
    await bob.offer(sdp="all")
    assert (await alice.expect("offer"))["payload"]["sdp"] == "all"
    await bob.expect_error("UNAVAILABLE")
    assert error["payload"]["message"].startswith("UNAVAILABLE")
    # New joins: UNAVAILABLE and 1013.
    refused = await clients.connect(n3, "dave", join=False)
    await refused.expect_error("UNAVAILABLE")
    await refused.expect_close(1013)
    # A clean leave during the outage: the same node hears it now, the others once Redis is back.
    await bob.ws.close()
    assert (await alice.expect("user_left"))["payload"]["user_id"] == "bob"


async def test_leave_during_an_outage_reaches_redis_when_it_returns(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """A clean leave while Redis is away is reconciled when Redis comes back with its data."""
    n1, n2 = await start_nodes(2, ttl=10.0)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n1, "bob")
    carol = await clients.connect(n2, "carol")
    await alice.expect("user_joined")
    for member in (alice, bob):
        await member.expect("user_joined")
    await redis.command("SAVE")  # the restart below loads this: Redis returns with its data
    await redis.stop()
    await n1.wait_ready(False, timeout=2.5)
    await bob.ws.close()
    assert (await alice.expect("user_left"))["payload"]["user_id"] == "bob"
    await redis.start()
    await asyncio.gather(n1.wait_ready(), n2.wait_ready())
    left = await carol.expect("user_left")
    assert left["payload"]["user_id"] == "bob"
    dave = await clients.connect(n2, "dave", join=False)
    assert sorted(users(await dave.expect("room_state"))) == ["alice", "carol", "dave"]


async def in_process_node(redis: RedisServer, app_client: AppClient, **overrides: Any) -> TestClient[Any, Any]:
    """Node "b" in this process (its hub reachable), once it is ready: its link to Redis is up."""
    client = await app_client(redis_url=redis.url, node_id="b", node_ttl=NODE_TTL, **overrides)
    hub = client.app[SIGNALING].hub
    await link_is(hub, up=True)
    return client


async def _room_over_a_and_b(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> tuple[Node, Any, Member, Member, Member]:
    """Node A (a process) with alice and bob, node B (in this process: its hub is
    reachable) with carol; then Redis stops and bob leaves during the outage."""
    (node_a,) = await start_nodes(1, grace=30.0)
    node_b = await in_process_node(redis, app_client, reconnect_grace=30.0)
    alice = await clients.connect(node_a, "alice")
    bob = await clients.connect(node_a, "bob")
    carol = await connector(node_b)("carol")
    await alice.expect("user_joined")
    for member in (alice, bob):
        await member.expect("user_joined")
    return node_a, node_b.app[SIGNALING].hub, alice, bob, carol


async def _leave_during_outage(redis: RedisServer, node_a: Node, alice: Member, bob: Member) -> None:
    await redis.stop()
    await node_a.wait_ready(False, timeout=2.5)
    await bob.ws.close()
    assert (await alice.expect("user_left"))["payload"]["user_id"] == "bob"


async def test_a_leave_that_overtakes_a_re_registration_reply_is_applied(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> None:
    """Redis back empty: node B re-registers; node A's re-registration, which tells of a
    leave during the outage, reaches B's subscriber before B has read its own reply.
    B applies it after the reply instead of dropping it as older than its mirror."""
    node_a, hub, alice, bob, carol = await _room_over_a_and_b(redis, start_nodes, clients, app_client)
    for _ in range(3):  # B's mirror of the room reads a version the empty Redis counts past only later
        dave = await clients.connect(node_a, "dave")
        await dave.ws.close()
        for member in (alice, bob, carol):
            await member.expect("user_joined")
            await member.expect("user_left")
    restored, heard = asyncio.Event(), asyncio.Event()
    call, on_message = hub.link.call, hub.link._on_message

    async def reply_after_the_leave(name: str, *args: Any) -> Any:
        reply = await call(name, *args)
        if name == "RESTORE":
            restored.set()
            await asyncio.wait_for(heard.wait(), TIMEOUT)
        return reply

    def hearing(data: bytes) -> None:
        on_message(data)
        if data[:1] == b"l" and b'"u":"bob"' in data:
            heard.set()

    hub.link.call, hub.link._on_message = reply_after_the_leave, hearing
    await _leave_during_outage(redis, node_a, alice, bob)
    node_a.signal(signal.SIGSTOP)  # A re-registers only once B has
    try:
        await redis.start()  # empty
        await asyncio.wait_for(restored.wait(), TIMEOUT * 2)
    finally:
        node_a.signal(signal.SIGCONT)
    left = await carol.expect("user_left")
    assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "left"}
    await expect_relay_back(alice, carol)


async def test_a_node_re_registers_only_once_it_hears_its_channel(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> None:
    """Redis back empty, and node B's subscriber is slow to come back: B re-registers
    after it is subscribed, so A's news of the leave (published on B's channel or
    left as a tombstone) reaches B; before, B registered deaf and never heard it."""
    node_a, hub, alice, bob, carol = await _room_over_a_and_b(redis, start_nodes, clients, app_client)
    registered = asyncio.Event()
    on_registered = hub.link._on_registered

    def noting_registration() -> None:
        registered.set()
        on_registered()

    hub.link._on_registered = noting_registration
    subscribe_now = gate_resubscription(hub)
    await _leave_during_outage(redis, node_a, alice, bob)
    node_a.signal(signal.SIGSTOP)  # A re-registers only once Redis knows B again
    try:
        await redis.start()  # empty
        await asyncio.wait_for(registered.wait(), TIMEOUT * 2)
    finally:
        node_a.signal(signal.SIGCONT)
    await node_a.line_matching(r"re-registered 1 slots")
    subscribe_now.set()
    left = await carol.expect("user_left")
    assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "left"}
    await expect_relay_back(alice, carol)


async def test_an_empty_restart_is_told_apart_by_the_node_that_set_the_generation(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> None:
    """Node B set the registry's generation (it read it first). Redis back empty, B reads its
    rooms again before node A has re-registered: B sees another generation and leaves A's
    alice to A's re-registration. Before, B set the same generation again (its boot id),
    took the empty registry for the old one and told carol that alice had left."""
    (node_b,) = await in_process_nodes(app_client, redis, "b")  # first: its subscription sets sig:gen
    hub = hub_of(node_b)
    (node_a,) = await start_nodes(1, prefix="a", grace=30.0)
    alice = await clients.connect(node_a, "alice")
    carol = await connector(node_b)("carol")
    await alice.expect("user_joined")
    restored, resynced = asyncio.Event(), asyncio.Event()
    reregister, resync = hub._reregister, hub._resync_rooms

    async def noting_reregister() -> None:
        await reregister()
        restored.set()

    async def noting_resync() -> None:
        await restored.wait()  # B's own re-registration first: the read finds carol alone
        await resync()
        resynced.set()

    hub._reregister, hub._resync_rooms = noting_reregister, noting_resync
    node_a.signal(signal.SIGSTOP)  # A re-registers only after B has read its rooms again
    try:
        await redis.stop()
        await link_is(hub, up=False)
        await redis.start()  # empty
        await asyncio.wait_for(resynced.wait(), TIMEOUT * 2)
        await quiet(carol)  # no user_left for alice
    finally:
        node_a.signal(signal.SIGCONT)
    await expect_relay_back(alice, carol)
    await quiet(carol)


async def test_pubsub_connection_killed(redis: RedisServer, start_nodes: StartNodes, clients: Clients) -> None:
    """CLIENT KILL TYPE pubsub: every node resubscribes and cross-node relay comes back by itself."""
    n1, n2 = await start_nodes(2)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n2, "bob")
    await alice.expect("user_joined")
    killed = await redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 2
    await expect_relay_back(alice, bob)
    await expect_relay_back(bob, alice)
    await asyncio.gather(n1.wait_ready(), n2.wait_ready())


async def test_json_logs_of_a_node_carry_its_id(start_nodes: StartNodes, clients: Clients) -> None:
    """Operators filter a cluster's logs by node: every JSON record of a node says which."""
    (node,) = await start_nodes(1, "--log-format", "json", prefix="json")
    member = await clients.connect(node, "alice")
    await member.ws.close()
    await node.line_matching(r'"message":"close room=room-1 user=alice')
    records = [json.loads(line) for line in node.lines if line.startswith("{")]
    assert any("registered" in record["message"] for record in records)
    assert records and all(record.get("node") == "json1" for record in records), records


async def test_scripts_flushed_under_a_live_node(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """SCRIPT FLUSH (what a failover to a replica, or a restart between two writes,
    looks like): the next scripts meet NOSCRIPT; the node loads them again and runs
    those commands, so joins and leaves go on with no outage."""
    n1, n2 = await start_nodes(2)
    alice = await clients.connect(n1, "alice")
    await redis.command("SCRIPT", "FLUSH")
    bob = await clients.connect(n2, "bob")  # its JOIN is the first script n2 sends
    assert (await alice.expect("user_joined"))["payload"]["user_id"] == "bob"
    await bob.ws.close()
    assert (await alice.expect("user_left"))["payload"]["user_id"] == "bob"
    for node in (n1, n2):
        assert await node.metric("signal_redis_up") == 1


async def test_sigterm_drains_to_another_node(start_nodes: StartNodes, clients: Clients) -> None:
    """SIGTERM: clients get 1001, slots stay held in Redis, and resume elsewhere with what was kept."""
    n1, n2 = await start_nodes(2, grace=10.0)
    bob = await clients.connect(n2, "bob")
    alice = await clients.connect(n1, "alice")  # last: nothing unconfirmed at the drain
    await bob.expect("user_joined")
    n1.signal(signal.SIGTERM)
    await alice.expect_close(1001)
    assert await n1.wait() == 0
    await bob.offer(sdp="while-away", target_user_id="alice")
    resumed = await clients.connect(n2, "alice", join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "while-away"
    await quiet(bob)  # no user_left, no user_joined


async def test_slow_redis_is_not_ready_then_recovers(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """DEBUG SLEEP stalls Redis: /readyz says 503 within 2 s, then 200 and relay in order again."""
    n1, n2 = await start_nodes(2, ttl=6.0)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n2, "bob")
    await alice.expect("user_joined")
    loop = asyncio.get_running_loop()
    stalled = await stall(redis, 3.0)  # the scenario: Redis answers nothing for 3 s
    started = loop.time()
    await n1.wait_ready(False, timeout=2.5)
    assert loop.time() - started <= 2.5
    await stalled
    await asyncio.gather(n1.wait_ready(), n2.wait_ready())
    for i in range(20):
        await alice.offer(sdp=str(i), target_user_id="bob")
    assert await relay_ids(bob, 20) == list(range(20))


async def test_node_id_collision_is_refused(redis: RedisServer, start_nodes: StartNodes) -> None:
    """A second live node with the same --node-id refuses to start, in one line."""
    await start_nodes(1)
    twin = Node("n1", ["--redis-url", redis.url])
    await twin._spawn(*COMMAND, "--port", "0", "--node-id", "n1", "--redis-url", redis.url,
                      env={"SIGNAL_JWT_SECRET": SECRET})
    assert await twin.wait() == 2
    assert any("--node-id: 'n1' is in use by another live node" in line for line in twin.lines), twin.lines


async def test_sentinel_failover(tmp_path: Path, clients: Clients) -> None:
    """Nodes find the master through a real redis-sentinel and follow it across a failover."""
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master = RedisServer(tmp_path / "master")
    await master.start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    sentinel = Sentinel(tmp_path, master.port, "signal")
    nodes: list[Node] = []
    try:
        await replica.start()
        await sentinel.start()

        # The sentinel logs the replica it found in the master's INFO (read every 10 s).
        await sentinel.line_matching(rf"\+slave slave 127\.0\.0\.1:{replica.port} ", timeout=15)
        assert await sentinel_command(sentinel, "SENTINEL", "REPLICAS", "signal")
        args = ["--redis-sentinel", f"127.0.0.1:{sentinel.port}", "--redis-master", "signal",
                "--node-ttl", "5", "--reconnect-grace", "10", "--heartbeat", "30"]
        nodes = [Node("s1", args), Node("s2", args)]
        await asyncio.gather(*(node.start() for node in nodes))
        alice = await clients.connect(nodes[0], "alice")
        bob = await clients.connect(nodes[1], "bob")
        await alice.expect("user_joined")
        await expect_relay_back(alice, bob)

        # The replica has both records once it acknowledges a write made after them (WAIT
        # returns at that acknowledgement; a replica sends no keyspace notifications).
        await master.command("SET", "test:replicated", "1")
        assert await master.command("WAIT", 1, int(TIMEOUT * 2000)) == 1
        assert int(await replica.command("HLEN", members_key("room-1"))) == 2
        await master.stop()
        await sentinel.line_matching(r"\+switch-master signal", timeout=20)
        await asyncio.gather(*(node.wait_ready(timeout=10) for node in nodes))
        await expect_relay_back(alice, bob, timeout=10)
        await expect_relay_back(bob, alice)
        carol = await clients.connect(nodes[0], "carol", join=False)
        assert users(await carol.expect("room_state")) == ["alice", "bob", "carol"]
    finally:
        for process in (*nodes, sentinel, replica, master):
            await process.kill()


async def sentinel_command(sentinel: Sentinel, *args: str) -> object:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=TIMEOUT)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


def test_single_node_never_imports_redis() -> None:
    """Without --redis-url the server (app, hub, handlers) runs without loading redis-py."""
    code = (
        "import sys\n"
        "from signal_server import create_standalone_app\n"
        "from tests.conftest import make_settings\n"
        "create_standalone_app(make_settings())\n"
        "assert not any(name == 'redis' or name.startswith('redis.') for name in sys.modules), 'redis imported'\n"
        "assert 'signal_server.cluster' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr


def test_backoff_is_capped_and_jittered() -> None:
    from signal_server.cluster.link import Backoff

    backoff = Backoff(base=0.1, cap=2.0)
    delays = [backoff.next() for _ in range(100)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(delay <= 2.0 for delay in delays) and max(delays[10:]) > 1.0
    assert len(set(delays[10:])) > 1  # jittered: nodes do not retry in lockstep
    backoff.reset()
    assert backoff.next() <= 0.1


def test_publishes_share_a_container_but_never_cross_a_script() -> None:
    """One publish per channel per run of publishes; scripts stay where they were queued."""
    from signal_server.cluster.link import SCRIPT_SHAS, _Command, _pipeline, pack_messages, unpack_messages

    def pub(node: str, data: bytes) -> _Command:
        return _Command(("PUBLISH", f"sig:ch:{node}", data))

    batch = [pub("a", b"1"), pub("b", b"x"), pub("a", b"2"), _Command(("r",), script="KEEP"), pub("a", b"3")]
    wire, groups = _pipeline(batch)
    assert [len(group) for group in groups] == [2, 1, 1, 1]
    assert groups[0] == [batch[0], batch[2]] and groups[2] == [batch[3]]
    assert wire == [
        ("PUBLISH", "sig:ch:a", pack_messages([b"1", b"2"])),
        ("PUBLISH", "sig:ch:b", b"x"),
        ("EVALSHA", SCRIPT_SHAS["KEEP"], 0, "r"),
        ("PUBLISH", "sig:ch:a", b"3"),
    ]
    assert list(unpack_messages(pack_messages([b"m{}\n" + b"\x00" * 300, b"p"]))) == [b"m{}\n" + b"\x00" * 300, b"p"]
    assert list(unpack_messages(b"m{}\nframe")) == [b"m{}\nframe"]


# ---------------------------------------------------------------- races and losses


async def record(redis: RedisServer, room: str, user: str) -> dict[str, Any] | None:
    raw = await redis.command("HGET", f"sig:{{{room}}}:m", user)
    return json.loads(raw) if raw else None


async def held_on(redis: RedisServer, room: str, user: str) -> None:
    """Wait until ``user``'s record in ``room`` is held (its connection vanished)."""

    async def held() -> bool:
        found = await record(redis, room, user)
        return found is not None and found["h"] > 0

    await redis.until(held, members_key(room))


async def stall(redis: RedisServer, seconds: float) -> asyncio.Task[bytes]:
    """The scenario, not a synchronisation: Redis does nothing for ``seconds`` (DEBUG SLEEP).
    Returns once the command is in Redis's socket (an idle Redis starts it at once); the
    task ends with its reply when Redis wakes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
    arguments = [b"DEBUG", b"SLEEP", str(seconds).encode()]
    writer.write(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in arguments))
    await writer.drain()

    async def reply() -> bytes:
        try:
            return await asyncio.wait_for(reader.readline(), seconds + TIMEOUT)
        finally:
            writer.close()

    return asyncio.create_task(reply())


async def events_about(member: Member, user: str, until: str) -> list[str]:
    """The user_joined/user_left kinds ``member`` gets about ``user``, up to the first ``until``."""
    kinds: list[str] = []
    while True:
        message = await member.recv()
        if message["type"] in ("user_joined", "user_left") and message["payload"]["user_id"] == user:
            kinds.append(message["type"])
            if message["type"] == until:
                return kinds


async def test_simultaneous_joins_through_several_nodes_leave_one_connection(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """One user joining through three nodes at once: Redis orders the JOINs, the last one
    wins and the others are closed with SESSION_REPLACED, even when a takeover event reaches
    a node before that node's own JOIN reply (room new there, or already there). Residents
    see user_joined before user_left. A race: bounded trials, each one a fresh room."""
    nodes = await start_nodes(3)
    for trial in range(8):
        room = f"race-{trial}"
        # Residents on the first two nodes; the room is new on the third.
        residents = [await clients.connect(node, f"resident{i}", room) for i, node in enumerate(nodes[:2])]
        await residents[0].expect("user_joined")
        user = f"user{trial}"
        connections = await asyncio.gather(*(clients.connect(node, user, room) for node in nodes))
        owner = await record(redis, room, user)
        assert owner is not None
        for node, member in zip(nodes, connections, strict=True):
            if node.node_id != owner["n"]:
                await member.expect_close(4410)
        survivor = connections[[node.node_id for node in nodes].index(owner["n"])]
        await quiet(survivor)
        assert not survivor.ws.closed
        await survivor.ws.close()
        for resident in residents:
            assert await events_about(resident, user, "user_left") == ["user_joined", "user_left"]
            await resident.ws.close()


async def test_a_message_during_a_resume_in_flight_is_delivered(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """alice's resume JOIN is held in Redis (DEBUG SLEEP) while bob sends to her: the frame
    reaches the resumed connection, through her old node and through another one."""
    n1, n2 = await start_nodes(2, grace=10.0)
    for via, room in ((n1, "local"), (n2, "remote")):
        bob = await clients.connect(n1, "bob", room)
        alice = await raw_client(n1, "alice", room)
        await bob.expect("user_joined")
        alice.abort()
        await held_on(redis, room, "alice")
        stalled = await stall(redis, 1.0)
        resumed = await clients.connect(via, "alice", room, join=False)  # its JOIN waits behind the stall
        await bob.offer(sdp="must-arrive", target_user_id="alice")
        await stalled
        state = await resumed.expect("room_state")
        assert state["payload"]["resumed"] is True
        assert (await resumed.expect("offer"))["payload"]["sdp"] == "must-arrive", room
        await quiet(resumed)
        await resumed.ws.close()
        await bob.ws.close()


async def test_a_frame_lost_while_the_home_node_was_cut_off_makes_a_resume_elsewhere_incomplete(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """bob sends to alice's held slot while her node cannot reach Redis: the loss is written to
    her record when Redis answers again, so her resume through another node says recovered false."""
    n1, n2 = await start_nodes(2, grace=15.0, ttl=10.0)
    bob = await clients.connect(n1, "bob")
    alice = await raw_client(n1, "alice")
    await bob.expect("user_joined")
    alice.abort()
    await held_on(redis, "room-1", "alice")
    stalled = await stall(redis, 2.5)
    await n1.wait_ready(False, timeout=2.5)
    await bob.offer(sdp="lost", target_user_id="alice")
    await quiet(bob)
    await stalled

    async def marked_lost() -> bool:
        found = await record(redis, "room-1", "alice")
        return found is not None and found["o"] == 1

    await redis.until(marked_lost, members_key("room-1"))
    await resume_incomplete(clients, n2)


async def test_redis_restarting_empty_makes_held_resumes_incomplete(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """Kept frames live only in Redis: after it restarts empty, the re-registered hold says so."""
    n1, n2 = await start_nodes(2, grace=15.0)
    bob = await clients.connect(n2, "bob")
    alice = await raw_client(n1, "alice")
    await bob.expect("user_joined")
    alice.abort()
    await held_on(redis, "room-1", "alice")
    await send_kept(redis, bob, "alice")
    await redis.stop()
    await redis.start()  # empty
    await asyncio.gather(n1.wait_ready(), n2.wait_ready())
    await held_on(redis, "room-1", "alice")  # re-registered by n1
    await resume_incomplete(clients, n2)


async def test_a_join_that_timed_out_but_ran_later_leaves_no_ghost(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """A JOIN the node gave up on (Redis stalled past the 5 s socket timeout) still runs when
    Redis wakes: the node reconciles the room, so the record goes and others see user_left."""
    n1, n2 = await start_nodes(2, "--max-participants", "2", ttl=10.0)
    bob = await clients.connect(n2, "bob")
    for _ in range(3):  # the JOIN may queue behind a tick caught by the stall, and then succeed
        stalled = await stall(redis, 6.0)
        ghost = await clients.connect(n1, "ghost", join=False)
        answer = await ghost.recv(timeout=TIMEOUT * 3)  # after the node's 5 s socket timeout
        assert await stalled == b"+OK\r\n"
        if answer["type"] == "error":
            break
        await ghost.ws.close()
        assert await events_about(bob, "ghost", "user_left") == ["user_joined", "user_left"]
    assert answer["payload"]["code"] == "UNAVAILABLE", answer
    await ghost.expect_close(1013)
    assert await events_about(bob, "ghost", "user_left") == ["user_joined", "user_left"]
    assert await record(redis, "room-1", "ghost") is None
    carol = await clients.connect(n1, "carol", join=False)
    assert users(await carol.expect("room_state")) == ["bob", "carol"]


async def test_node_room_sets_shrink_on_takeover_and_go_with_a_dead_node(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """sig:n:<node>:r lists only rooms where the node has members: a takeover removes the room
    from the old node's set, and a dead node's set is deleted once its slots are released."""
    n1, n2 = await start_nodes(2)
    first = await clients.connect(n1, "alice")
    assert await redis.command("SISMEMBER", "sig:n:n1:r", "room-1") == 1
    second = await clients.connect(n2, "alice")
    await first.expect_close(4410)
    assert await redis.command("SISMEMBER", "sig:n:n1:r", "room-1") == 0
    assert await redis.command("SISMEMBER", "sig:n:n2:r", "room-1") == 1
    await n2.kill()

    async def set_gone() -> bool:
        return int(await redis.command("EXISTS", "sig:n:n2:r")) == 0

    await redis.until(set_gone, "sig:n:n2:r")
    found = await record(redis, "room-1", "alice")
    assert found is not None and found["h"] > 0 and found["r"] == "node_lost"
    del second  # open until here: its node died under it


async def test_a_frame_reaching_a_draining_node_is_kept(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """SIGTERM while Redis is stalled: bob's frame for alice reaches her node's channel as its
    drain flushes. The node stops listening before its last flush, so the frame is kept in
    Redis (or kept by bob's node when nobody listens): the resume replays it, or says it lost
    something; never recovered with the frame missing."""
    n1, n2 = await start_nodes(2, grace=10.0)
    bob = await clients.connect(n2, "bob")
    alice = await clients.connect(n1, "alice")  # last: nothing unconfirmed at the drain
    await bob.expect("user_joined")
    stalled = await stall(redis, 1.0)
    n1.signal(signal.SIGTERM)
    await alice.expect_close(1001)
    await bob.offer(sdp="during-drain", target_user_id="alice")
    await stalled
    assert await n1.wait() == 0
    resumed = await clients.connect(n2, "alice", join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True
    if state["payload"]["recovered"]:
        assert (await resumed.expect("offer"))["payload"]["sdp"] == "during-drain"


def block_this_loop(seconds: float) -> None:
    """The behaviour under test, not a synchronisation: this process's event loop runs
    nothing at all for ``seconds``, as in a CPU-bound burst or a starved process."""
    time.sleep(seconds)


class _LinkWatch:
    """A RedisLink of this process on the test's redis-server, with its states and pongs seen."""

    def __init__(self, redis: RedisServer) -> None:
        from signal_server.cluster.link import RedisLink
        from signal_server.settings import Settings

        self.states: list[bool] = []
        self.pongs = 0
        self._changed = asyncio.Event()
        self.link = RedisLink(
            Settings(redis_url=redis.url, node_ttl=NODE_TTL), "watch", lambda data: None, self._state, lambda: None
        )
        self._dispatch = self.link._dispatch
        self.on_pong: Callable[[], None] = lambda: None
        self.link._dispatch = self._seen  # type: ignore[method-assign]

    def _state(self, up: bool) -> None:
        self.states.append(up)
        self._changed.set()

    def _seen(self, data: bytes) -> None:
        self._dispatch(data)
        if data[:1] == b"p":
            self.pongs += 1
            self._changed.set()
            self.on_pong()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT * 2):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


async def test_a_stalled_node_loop_does_not_declare_redis_down(redis: RedisServer) -> None:
    """The node's own loop does nothing for longer than the ping window (a CPU-bound
    burst, a starved process) while Redis is fine: the replies waiting in its sockets
    are read on the next turns, and the link never goes down."""
    from signal_server.cluster.link import PING_WINDOW

    watch = _LinkWatch(redis)
    await watch.link.start()
    try:
        await watch.until(lambda: watch.link.up)
        stalled: list[int] = []

        def stall_once() -> None:
            if not stalled:
                stalled.append(watch.pongs)
                # Right after a pong (so none is in flight) the loop blocks for longer than the window.
                block_this_loop(PING_WINDOW + 1.0)

        watch.on_pong = stall_once
        await watch.until(lambda: bool(stalled) and watch.pongs >= stalled[0] + 3)
        assert watch.states == [True], watch.states
    finally:
        await watch.link.stop()


async def test_a_subscription_redis_dropped_is_noticed_and_renewed(redis: RedisServer) -> None:
    """Redis answers, but no longer has our subscription (our subscriber does not know):
    the ping's zero receivers take the link down, and it subscribes again."""
    watch = _LinkWatch(redis)
    await watch.link.start()
    try:
        await watch.until(lambda: watch.link.up)
        assert watch.link._pubsub is not None
        await watch.link._pubsub.unsubscribe(watch.link.channel)  # behind the subscriber's back
        await watch.until(lambda: watch.states[-2:] == [False, True])
    finally:
        await watch.link.stop()


async def test_a_pooled_connection_idle_through_an_empty_restart_is_replaced_before_use(
    redis: RedisServer, app_client: AppClient
) -> None:
    """A connection of the node's pool sits idle while Redis restarts empty (one the webhook
    sender or an admin read had; the writer and the subscriber hold their own). Back in the
    pool, it is the next one out: the pool reconnects it before anything is sent, and the
    admin read that gets it is answered (before, with redis-py 8.1's maintenance
    notifications on by default, it went out as it was: "Connection closed by server", 503;
    a resubscription or the webhook sender's next read could meet it the same way)."""
    (node,) = await in_process_nodes(app_client, redis, "a")
    hub = hub_of(node)
    pool = hub.link.redis.connection_pool
    idle = await pool.get_connection()
    await redis.stop()
    await link_is(hub, up=False)
    await redis.start()  # empty
    await link_is(hub, up=True)
    await pool.release(idle)  # the last one in: the next one out
    response = await node.get("/webrtc/rooms", headers={"Authorization": f"Bearer {make_token('ops', admin=True)}"})
    assert response.status == 200, await response.text()
    assert hub.link.up


async def proxied_node(redis: RedisServer, node_id: str, args: list[str]) -> tuple[Node, StallProxy]:
    """A node whose connections to Redis pass through a proxy the test can pause."""
    proxy = await StallProxy("127.0.0.1", redis.port).start()
    node = Node(node_id, [f"redis://127.0.0.1:{proxy.port}" if arg == redis.url else arg for arg in args])
    try:
        await node.start()
    except BaseException:
        await node.kill()
        await proxy.close()
        raise
    return node, proxy


async def test_a_broadcast_reaching_a_resume_in_flight_is_delivered_once(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """alice's slot is held on n1 and she resumes through n3, whose link to Redis lags
    (a proxy holds it). bob (n2) broadcasts meanwhile: n1 keeps the copy for alice, and
    n3 gets the copy for carol while alice's JOIN is in flight there. alice gets the
    message once (the kept copy), carol once."""
    n1, n2 = await start_nodes(2, grace=10.0)
    n3, proxy = await proxied_node(redis, "n3", n1.args)
    try:
        bob = await clients.connect(n2, "bob")
        carol = await clients.connect(n3, "carol")
        await bob.expect("user_joined")
        alice = await raw_client(n1, "alice")  # last: nothing unconfirmed when she vanishes
        for member in (bob, carol):
            await member.expect("user_joined")
        alice.abort()
        await held_on(redis, "room-1", "alice")
        proxy.pause()
        resumed = await clients.connect(n3, "alice", join=False)  # its JOIN waits in the proxy
        await bob.offer(sdp="once")

        async def kept_by_n1() -> bool:
            return await kept_count(redis, "room-1", "alice") == 1

        await redis.until(kept_by_n1, kept_key("room-1", "alice"))
        proxy.resume()
        state = await resumed.expect("room_state")
        assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
        assert (await resumed.expect("offer"))["payload"]["sdp"] == "once"
        await quiet(resumed)
        assert (await carol.expect("offer"))["payload"]["sdp"] == "once"
        await quiet(carol)
    finally:
        await n3.kill()
        await proxy.close()


async def test_a_message_to_a_resume_in_flight_here_is_not_overtaken(redis: RedisServer, clients: Clients) -> None:
    """alice (held on n1) resumes through n2, where bob is. bob's offer sent while her JOIN
    is in flight waits on n2 for her, instead of going to n1 and back through the registry,
    where his next offer, delivered on n2 directly, would overtake it."""
    base = ["--redis-url", redis.url, "--node-ttl", str(NODE_TTL), "--reconnect-grace", "10.0", "--heartbeat", "30"]
    started = [await proxied_node(redis, "n1", base)]
    try:
        started.append(await proxied_node(redis, "n2", base))
        (n1, p1), (n2, p2) = started
        bob = await clients.connect(n2, "bob")
        alice = await raw_client(n1, "alice")
        await bob.expect("user_joined")
        alice.abort()
        await held_on(redis, "room-1", "alice")
        p2.pause()
        resumed = await clients.connect(n2, "alice", join=False)  # its JOIN waits in n2's proxy
        await bob.offer(sdp="first", target_user_id="alice")
        p1.pause()  # what reaches n1 now waits, as on a busy node
        p2.resume()
        state = await resumed.expect("room_state")
        assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
        await bob.offer(sdp="second", target_user_id="alice")
        p1.resume()
        assert [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(2)] == ["first", "second"]
        await quiet(resumed)
    finally:
        for node, proxy in started:
            await node.kill()
            await proxy.close()


async def command_connection(redis: RedisServer, proxy: StallProxy) -> int:
    """Which of the proxy's connections is its node's command connection (not the subscriber)."""
    listed = (await redis.command("CLIENT", "LIST")).decode()
    subscribers = {int(m) for m in re.findall(r"addr=127\.0\.0\.1:(\d+) .* sub=[1-9]", listed)}
    found = [i for i, port in enumerate(proxy.upstream_ports()) if port not in subscribers]
    assert len(found) == 1, (listed, proxy.upstream_ports())
    return found[0]


async def test_a_command_connection_that_goes_silent_is_replaced(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """Redis stops answering on node A's command connection alone (a proxy holds it; no FIN,
    no RST): A goes not-ready, drops that connection once a write has waited 5 s, and is
    ready again on a new one, relaying both ways. (The writer's connection has no socket
    timeout; without the drop it would wait on the silent one for good.) The node TTL
    outlasts the silence: A is not found dead meanwhile."""
    (node_b,) = await start_nodes(1, prefix="b", ttl=30.0)
    node_a, proxy = await proxied_node(redis, "a1", node_b.args)
    try:
        alice = await clients.connect(node_a, "alice")
        bob = await clients.connect(node_b, "bob")
        await alice.expect("user_joined")
        proxy.pause(await command_connection(redis, proxy))
        await node_a.wait_ready(False)
        await node_a.line_matching(r"left a write unanswered for 5 s")
        await node_a.wait_ready(True)
        await expect_relay_back(alice, bob)
        await expect_relay_back(bob, alice)
    finally:
        proxy.resume()
        await node_a.kill()
        await proxy.close()


async def test_a_message_forwarded_from_a_dead_node_is_not_overtaken(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """alice's node dies; bob (n3) sends to her twice while his node still believes her on
    the dead one and the replies lag (n3's command connection is held), then once after it
    learned that she resumed through n2. The first two come back with no receiver and the
    registry forwards them; the third must not overtake them in the same pipeline."""
    n1, n2 = await start_nodes(2, grace=10.0)
    n3, proxy = await proxied_node(redis, "n3", n1.args)
    try:
        bob = await clients.connect(n3, "bob")
        alice = await raw_client(n1, "alice")
        await bob.expect("user_joined")
        await n1.kill()
        alice.abort()
        proxy.pause(await command_connection(redis, proxy))  # n3's subscriber goes on
        await bob.offer(sdp="1", target_user_id="alice")  # to n1: sent or queued, no reply reaches n3
        await bob.offer(sdp="2", target_user_id="alice")
        resumed = await clients.connect(n2, "alice", join=False)
        assert (await resumed.expect("room_state"))["payload"]["resumed"] is True
        await clients.connect(n2, "dave")
        await resumed.expect("user_joined")
        await bob.expect("user_joined")  # n3 read the takeover event before this one
        await bob.offer(sdp="3", target_user_id="alice")  # queued, now addressed to n2
        proxy.resume()
        assert [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(3)] == ["1", "2", "3"]
        await quiet(resumed)
    finally:
        await n3.kill()
        await proxy.close()


# ---------------------------------------------------- hand-off of a resume elsewhere


async def in_process_nodes(app_client: AppClient, redis: RedisServer, *ids: str) -> list[TestClient[Any, Any]]:
    """Nodes in this process (their hubs can be watched and held), with a long grace; ready."""
    nodes = [
        await app_client(redis_url=redis.url, node_id=node, node_ttl=NODE_TTL, reconnect_grace=30.0)
        for node in ids
    ]
    for node in nodes:
        await link_is(hub_of(node), up=True)
    return nodes


async def link_is(hub: Any, *, up: bool) -> None:
    """Wait until the hub's Redis link is up (pings come back through its subscriber) or down:
    woken by the link's own state callback, called at each change."""
    link = hub.link
    if bool(link.up) is up:
        return
    changed = asyncio.Event()
    on_state = link._on_state

    def noting(state: bool) -> None:
        on_state(state)
        changed.set()

    link._on_state = noting
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            while bool(link.up) is not up:
                changed.clear()
                await changed.wait()
    finally:
        link._on_state = on_state


def hub_of(node: TestClient[Any, Any]) -> Any:
    return node.app[SIGNALING].hub


async def raw_in_process(node: TestClient[Any, Any], user: str, room: str = "room-1") -> RawWebSocket:
    """A client of an in-process node that can vanish without a close frame."""
    assert node.port is not None
    raw = await RawWebSocket.connect("127.0.0.1", node.port, f"/webrtc/ws/{room}?token={make_token(user)}")
    await raw.expect("room_state")
    return raw


def watch(hub: Any, predicate: Callable[[bytes], bool]) -> asyncio.Event:
    """Set once the node's subscriber has handed on (and the hub handled) a message matching ``predicate``."""
    seen = asyncio.Event()
    on_message = hub.link._on_message

    def hearing(data: bytes) -> None:
        on_message(data)
        if predicate(data):
            seen.set()

    hub.link._on_message = hearing
    return seen


class Gate:
    """Holds every message a node's subscriber hands on until opened, then passes them on in order."""

    def __init__(self, hub: Any) -> None:
        self.held: list[bytes] = []
        self._open = False
        self._changed = asyncio.Event()
        self._on_message = hub.link._on_message
        hub.link._on_message = self._take

    def _take(self, data: bytes) -> None:
        if self._open:
            self._on_message(data)
            return
        self.held.append(data)
        self._changed.set()

    async def holding(self, predicate: Callable[[list[bytes]], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate(self.held):
                self._changed.clear()
                await self._changed.wait()

    def open(self) -> None:
        self._open = True
        held, self.held = self.held, []
        for data in held:
            self._on_message(data)


def offer_for(sdp: str) -> Callable[[bytes], bool]:
    return lambda data: data[:1] == b"m" and f'"sdp":"{sdp}"'.encode() in data


async def offers_waiting_in_the_old_node(
    app_client: AppClient, redis: RedisServer
) -> tuple[TestClient[Any, Any], TestClient[Any, Any], TestClient[Any, Any], Member, Gate]:
    """Nodes A, B, C in this process; alice's slot held on A; bob (on B) has offered b0-b2 to her,
    and they wait in A's subscriber (the gate returned). Returns A, B, C, bob and the gate."""
    node_a, node_b, node_c = await in_process_nodes(app_client, redis, "a", "b", "c")
    bob = await connector(node_b)("bob")
    alice = await raw_in_process(node_a, "alice")
    await bob.expect("user_joined")
    alice.abort()
    await held_on(redis, "room-1", "alice")
    gate = Gate(hub_of(node_a))
    for i in range(3):
        await bob.offer(sdp=f"b{i}", target_user_id="alice")
    await gate.holding(lambda held: any(offer_for("b2")(data) for data in held))
    return node_a, node_b, node_c, bob, gate


async def resume_and_send_straight(node_b: TestClient[Any, Any], node_c: TestClient[Any, Any], bob: Member) -> Member:
    """alice resumes through C; once bob's node has heard it, bob offers b3 (straight to C)."""
    switched = watch(hub_of(node_b), lambda data: data[:1] == b"t" and b'"u":"alice"' in data)
    resumed = await connector(node_c)("alice", join=False)
    await asyncio.wait_for(switched.wait(), TIMEOUT)  # bob's node now sends to C
    await bob.offer(sdp="b3", target_user_id="alice")
    return resumed


async def test_frames_still_on_their_way_through_the_old_node_reach_a_resume_elsewhere_in_order(
    redis: RedisServer, app_client: AppClient
) -> None:
    """alice's slot is held on node A; bob's offers to her sit in A's subscriber while she resumes
    through node C, and bob's next offer goes straight to C. A then keeps-forwards the earlier ones:
    C waits for the hand-off barriers, replays A's forwards before bob's direct offer, and only
    then says recovered true (before, the direct one came first and the order was lost)."""
    _, node_b, node_c, bob, gate = await offers_waiting_in_the_old_node(app_client, redis)
    direct = watch(hub_of(node_c), offer_for("b3"))
    resumed = await resume_and_send_straight(node_b, node_c, bob)
    await asyncio.wait_for(direct.wait(), TIMEOUT)
    gate.open()
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(4)] == ["b0", "b1", "b2", "b3"]
    await quiet(resumed)


def gate_resubscription(hub: Any) -> asyncio.Event:
    """The node's next subscriptions wait until the returned event is set."""
    allowed = asyncio.Event()
    make_pubsub = hub.link.redis.pubsub

    def gated_pubsub(**options: Any) -> Any:
        pubsub = make_pubsub(**options)
        subscribe = pubsub.subscribe

        async def subscribe_when_allowed(*channels: Any) -> Any:
            await allowed.wait()
            return await subscribe(*channels)

        pubsub.subscribe = subscribe_when_allowed
        return pubsub

    hub.link.redis.pubsub = gated_pubsub
    return allowed


async def kill_subscriber(redis: RedisServer, hub: Any) -> None:
    """CLIENT KILL the pub/sub connection of one in-process node (found by its client name),
    whose resubscription is gated: returns once the node is down and nobody listens on its
    channel (redis-py's reconnect of the killed connection subscribes once more, briefly,
    before the link closes it)."""
    clients = await redis.command("CLIENT", "LIST", "TYPE", "pubsub")
    if isinstance(clients, bytes):
        clients = [dict(field.split("=", 1) for field in line.split()) for line in clients.decode().splitlines()]
    ids = [client["id"] for client in clients if client.get("name") == f"signal-{hub.node}"]
    assert len(ids) == 1, clients
    await redis.command("CLIENT", "KILL", "ID", ids[0])
    await link_is(hub, up=False)

    async def deaf() -> bool:
        channel = f"sig:ch:{hub.node}"
        return bool(await redis.command("PUBSUB", "NUMSUB", channel) == [channel.encode(), 0])

    # Polled: Redis announces no (un)subscription; only PUBSUB NUMSUB tells.
    await poll_until(deaf)


async def test_a_resume_elsewhere_while_the_home_node_is_cut_off_is_incomplete(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> None:
    """alice's slot is held on node A, whose subscriber is gone (A cannot hear Redis, so it drops
    carol's offer to alice instead of keeping it). alice resumes through node C before A is back:
    A's key is alive and A has a connection, but it did not hear the takeover: recovered false
    (before, true with carol's offer lost), and the offer Redis did keep is not replayed: never a
    partial replay (before, it came after the room_state that said recovered false)."""
    (node_c,) = await start_nodes(1, grace=30.0, prefix="c")
    (node_a,) = await in_process_nodes(app_client, redis, "a")
    hub = hub_of(node_a)
    carol = await connector(node_a)("carol")
    alice = await raw_in_process(node_a, "alice")
    await carol.expect("user_joined")
    alice.abort()
    await held_on(redis, "room-1", "alice")
    await send_kept(redis, carol, "alice")
    allowed = gate_resubscription(hub)
    try:
        await kill_subscriber(redis, hub)
        await carol.offer(sdp="dropped", target_user_id="alice")
        await quiet(carol)
        resumed = await clients.connect(node_c, "alice", join=False)
        state = await resumed.expect("room_state")
        assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False
        await quiet(resumed)
    finally:
        allowed.set()
    await link_is(hub, up=True)
    await expect_relay_back(carol, resumed)


async def test_events_missed_while_resubscribing_are_read_again(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient
) -> None:
    """Node B's subscriber is killed and its resubscription held back while bob leaves and dave
    joins through node A: both events are published to nobody on B. Once B is subscribed again it
    reads the room from the registry, so carol gets user_left bob and user_joined dave, once each."""
    (node_a,) = await start_nodes(1, prefix="a")
    (node_b,) = await in_process_nodes(app_client, redis, "b")
    hub = hub_of(node_b)
    alice = await clients.connect(node_a, "alice")
    bob = await clients.connect(node_a, "bob")
    await alice.expect("user_joined")
    carol = await connector(node_b)("carol")
    for member in (alice, bob):
        await member.expect("user_joined")
    allowed = gate_resubscription(hub)
    try:
        await kill_subscriber(redis, hub)
        await bob.ws.close()
        assert (await alice.expect("user_left"))["payload"]["user_id"] == "bob"
        await clients.connect(node_a, "dave")
        assert (await alice.expect("user_joined"))["payload"]["user_id"] == "dave"
    finally:
        allowed.set()
    seen = {(message["type"], message["payload"]["user_id"]) for message in [await carol.recv(), await carol.recv()]}
    assert seen == {("user_left", "bob"), ("user_joined", "dave")}
    await link_is(hub, up=True)
    await quiet(carol)
    await expect_relay_back(carol, alice)


async def test_a_node_whose_clock_is_five_minutes_ahead_joins_holds_and_resumes_on_time(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients
) -> None:
    """Node 1 runs under libfaketime, its wall and monotonic clocks 300 s ahead of node 2's and
    Redis's: deadlines are Redis TIME in the scripts and loop time on the node, so joins, a hold
    resumed through node 2 with its kept offer, and a hold that expires (user_left after the
    grace, not 300 s early or late) behave as with agreeing clocks. (Tokens are valid for 600 s,
    so the skewed node still accepts them.)"""
    library = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
    if not library.exists():  # another architecture: ask the package where it put it
        listed = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=True)
        library = Path(next(line for line in listed.stdout.split() if line.endswith("/libfaketime.so.1")))
    args = ["--redis-url", redis.url, "--node-ttl", str(NODE_TTL), "--reconnect-grace", str(GRACE),
            "--heartbeat", "30"]
    ahead = Node("ahead", args, env={"LD_PRELOAD": str(library), "FAKETIME": "+300s"})
    try:
        await ahead.start()
        probe = await clients.connect(ahead, "probe", "clock", join=False)
        stamped = (await probe.expect("room_state"))["timestamp"]  # the node's wall clock
        skew = datetime.fromisoformat(stamped.replace("Z", "+00:00")).timestamp() - time.time()
        assert 290 <= skew <= 310, stamped
        (normal,) = await start_nodes(1)
        bob = await clients.connect(normal, "bob")
        alice = await raw_client(ahead, "alice")
        assert (await bob.expect("user_joined"))["payload"]["user_id"] == "alice"
        alice.abort()
        await held_on(redis, "room-1", "alice")
        await send_kept(redis, bob, "alice")
        resumed = await clients.connect(normal, "alice", join=False)
        state = await resumed.expect("room_state")
        assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
        assert (await resumed.expect("offer"))["payload"]["sdp"] == "kept"
        carol = await raw_client(ahead, "carol")
        for member in (bob, resumed):
            assert (await member.expect("user_joined"))["payload"]["user_id"] == "carol"
        loop = asyncio.get_running_loop()
        carol.abort()
        await held_on(redis, "room-1", "carol")
        held = loop.time()
        left = await bob.expect("user_left")
        assert left["payload"] == {"user_id": "carol", "username": "carol", "reason": "timeout"}
        assert GRACE - 0.5 <= loop.time() - held <= GRACE + 2.0
        assert ahead.count(r"is gone") + normal.count(r"node ahead is gone") == 0
    finally:
        await ahead.kill()


async def test_a_cluster_join_that_fails_after_admission_is_rolled_back_in_redis(
    redis: RedisServer, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing across the registry: Redis admitted ann, then encoding her room_state failed
    on the node. Her record is taken back out of Redis (no ghost for the other nodes, no place taken),
    the node keeps no slot for her, and she gets 1011."""
    (node_a,) = await in_process_nodes(app_client, redis, "a")
    hub = hub_of(node_a)
    fail_room_state_once(monkeypatch)
    victim = await connector(node_a)("ann", join=False)
    message = await asyncio.wait_for(victim.ws.receive(), TIMEOUT)
    assert message.type is WSMsgType.CLOSE and message.data == 1011, message
    await hub.link.flush()  # replies in queue order: the rollback has run once this returns
    assert await redis.command("HGET", "sig:{room-1}:m", "ann") is None
    assert "ann" not in getattr(hub.rooms.get("room-1"), "slots", {})
    bob = await connector(node_a)("bob", join=False)
    state = await bob.expect("room_state")
    assert [p["user_id"] for p in state["payload"]["participants"]] == ["bob"]
