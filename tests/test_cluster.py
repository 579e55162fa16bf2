"""Three real nodes on one real redis-server act as one signaling server.

Each test starts its own redis-server (no persistence) and node processes on
free loopback ports, with short node TTL and grace so that dead-node and
expiry paths finish in seconds. Every wait is on a message, a log line or an
HTTP answer, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import ClientSession, WSMsgType

from .cluster import Clients, Node, RedisServer, wait_until
from .conftest import TIMEOUT, Member, make_token
from .rawws import RawWebSocket

GRACE = 2.0
NODE_TTL = 2.0

StartNodes = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start_nodes(redis: RedisServer) -> AsyncIterator[StartNodes]:
    started: list[Node] = []

    async def start(count: int = 3, *extra: str, grace: float = GRACE, prefix: str = "n") -> list[Node]:
        args = [
            "--redis-url", redis.url, "--node-ttl", str(NODE_TTL), "--reconnect-grace", str(grace),
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

    await wait_until(three_nodes)
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
    alice = await raw_client(n1, "alice")
    bob = await clients.connect(n2, "bob")
    carol = await clients.connect(n1, "carol")
    for _ in range(2):
        await alice.expect("user_joined")
    await bob.expect("user_joined")
    alice.abort()
    await n1.line_matching(r"close room=room-1 user=alice clean=False")
    for i in range(10):
        await bob.offer(sdp=f"b{i}", target_user_id="alice")  # from another node
        await carol.offer(sdp=f"c{i}", target_user_id="alice")  # from alice's old node
    await bob.send("ping")
    await bob.expect("pong")
    resumed = await clients.connect(n3, "alice", join=False)
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert users(state) == ["alice", "bob", "carol"]
    got = [(await resumed.expect("offer"))["payload"]["sdp"] for _ in range(20)]
    assert [s for s in got if s[0] == "b"] == [f"b{i}" for i in range(10)]
    assert [s for s in got if s[0] == "c"] == [f"c{i}" for i in range(10)]
    # Live traffic after the replay, and nothing duplicated.
    await bob.offer(sdp="live", target_user_id="alice")
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "live"
    await carol.offer(sdp="live2", target_user_id="alice")
    assert (await resumed.expect("offer"))["payload"]["sdp"] == "live2"

