"""Webhooks of a cluster when things break: a node killed with events in flight,
Redis restarted empty, the Redis queue full. Real redis-server, real node
processes, a real receiver that verifies every signature."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from . import test_cluster
from .cluster import Clients, Node, RedisServer, poll_until
from .test_cluster import StartNodes
from .webhook_receiver import WEBHOOK_SECRET, Receiver, summary

redis = test_cluster.redis
start_nodes = test_cluster.start_nodes
clients = test_cluster.clients

# The order of the events of one atomic change (same created_at at worst).
RANK = {"room_started": 0, "participant_joined": 1, "participant_resumed": 1, "participant_left": 1,
        "room_finished": 2}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    instance = await Receiver().start()
    yield instance
    await instance.close()


def hooks(receiver: Receiver, *extra: str) -> tuple[str, ...]:
    return ("--webhook-url", receiver.url, "--webhook-secret", WEBHOOK_SECRET, *extra)


def by_room(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, str | None, str | None]]]:
    """Each room's events in the documented order: created_at, then the order within one change."""
    rooms: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        rooms.setdefault(event["room_id"], []).append(event)
    return {
        room: summary(sorted(found, key=lambda e: (e["created_at"], RANK[e["event"]])))
        for room, found in rooms.items()
    }


QUEUE = "sig:wh:q"  # the cluster's events not taken yet
IN_FLIGHT = "sig:wh:f:*"  # each node process's taken events


async def in_flight(redis: RedisServer) -> dict[str, int]:
    """Events each node process has taken and not finished: node id -> count."""
    counts: dict[str, int] = {}
    for key in await redis.command("KEYS", "sig:wh:f:*"):
        node = key.decode().split(":")[3]
        counts[node] = counts.get(node, 0) + int(await redis.command("LLEN", key))
    return counts


async def test_events_in_flight_on_a_killed_node_are_delivered_by_another(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, receiver: Receiver
) -> None:
    """The receiver holds every request, so the nodes hold what they took; one is
    SIGKILLed. Once it is found dead its events go back to the queue and a survivor
    sends them: every event reaches the receiver (same ids), in order per room."""
    receiver.mode = "hang"
    nodes = await start_nodes(3, *hooks(receiver, "--webhook-timeout", "60"), grace=30)
    rooms = [f"r{index}" for index in range(6)]
    for index, room in enumerate(rooms):
        member = await clients.connect(nodes[index % 3], f"u{index}", room)
        await member.ws.close()
    expected = {
        room: [("room_started", room, None, None), ("participant_joined", room, f"u{index}", None),
               ("participant_left", room, f"u{index}", "left"), ("room_finished", room, None, None)]
        for index, room in enumerate(rooms)
    }

    async def all_taken() -> bool:
        queued = int(await redis.command("LLEN", "sig:wh:q"))
        return queued == 0 and sum((await in_flight(redis)).values()) == 24

    await redis.until(all_taken, QUEUE, IN_FLIGHT)
    taken = await in_flight(redis)
    victim: Node = next(node for node in nodes if node.node_id == max(taken, key=lambda n: taken[n]))
    assert taken[victim.node_id] >= 2  # one request held at the receiver, the rest only on the node
    await victim.kill()
    receiver.release()

    events = await receiver.wait_unique(24, timeout=30)
    assert Counter(summary(events)) == Counter(item for sequence in expected.values() for item in sequence)
    assert by_room(events) == expected

    async def nothing_in_flight() -> bool:
        return sum((await in_flight(redis)).values()) == 0 and not await redis.command("SMEMBERS", "sig:wh:orphans")

    await redis.until(nothing_in_flight, IN_FLIGHT, "sig:wh:orphans")
    assert receiver.rejected == 0


async def test_a_node_restarted_under_its_id_gives_back_what_its_predecessor_took(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, receiver: Receiver
) -> None:
    """The only node dies holding events; it comes back under the same id before
    anyone found it dead: it gives the old process's events back and sends them."""
    receiver.mode = "hang"
    (node,) = await start_nodes(1, *hooks(receiver, "--webhook-timeout", "60"), grace=30)
    for index in range(2):
        member = await clients.connect(node, f"u{index}", f"r{index}")
        await member.ws.close()

    async def all_taken() -> bool:
        return (await in_flight(redis)).get(node.node_id) == 8

    await redis.until(all_taken, IN_FLIGHT)
    await node.kill()
    receiver.release()

    async def expired() -> bool:
        return int(await redis.command("EXISTS", f"sig:node:{node.node_id}")) == 0

    await redis.until(expired, f"sig:node:{node.node_id}")
    again = Node(node.node_id, node.args)
    try:
        await again.start()
        events = await receiver.wait_unique(8, timeout=20)
        assert sorted(summary(events)) == sorted(
            item for index in range(2) for item in [
                ("room_started", f"r{index}", None, None), ("participant_joined", f"r{index}", f"u{index}", None),
                ("participant_left", f"r{index}", f"u{index}", "left"), ("room_finished", f"r{index}", None, None),
            ]
        )
    finally:
        await again.kill()


async def test_a_node_stopped_cleanly_gives_back_what_it_had_not_delivered(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, receiver: Receiver
) -> None:
    """SIGTERM on a node holding events: it deregisters (nobody will find it dead),
    and its events go back to the queue as it does; the other node sends them."""
    receiver.mode = "hang"
    nodes = await start_nodes(2, *hooks(receiver, "--webhook-timeout", "60"), grace=30)
    for index in range(4):
        member = await clients.connect(nodes[index % 2], f"u{index}", f"r{index}")
        await member.ws.close()

    async def all_taken() -> bool:
        return int(await redis.command("LLEN", "sig:wh:q")) == 0 and sum((await in_flight(redis)).values()) == 16

    await redis.until(all_taken, QUEUE, IN_FLIGHT)
    taken = await in_flight(redis)
    stopping = next(node for node in nodes if node.node_id == max(taken, key=lambda n: taken[n]))
    stopping.signal(signal.SIGTERM)
    assert await stopping.wait() == 0
    assert await redis.command("HEXISTS", "sig:nodes", stopping.node_id) == 0  # deregistered
    receiver.release()
    events = await receiver.wait_unique(16, timeout=20)
    assert by_room(events) == {
        f"r{index}": [
            ("room_started", f"r{index}", None, None), ("participant_joined", f"r{index}", f"u{index}", None),
            ("participant_left", f"r{index}", f"u{index}", "left"), ("room_finished", f"r{index}", None, None),
        ]
        for index in range(4)
    }


async def test_events_dropped_because_the_redis_queue_is_full_are_a_metric(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, receiver: Receiver
) -> None:
    """The receiver holds, each node holds 1,000 events in flight, 10,000 more wait
    in Redis: a join's two events are not queued, and every node's /metrics says so."""
    receiver.mode = "hang"
    n1, n2 = await start_nodes(2, *hooks(receiver, "--webhook-timeout", "60"))
    filler = [f'{{"id":"fill-{i}","e":"room_started","r":"fill","t":0}}' for i in range(12_000)]
    await redis.command("RPUSH", "sig:wh:q", *filler)

    async def full() -> bool:
        return int(await redis.command("LLEN", "sig:wh:q")) == 10_000 and sum((await in_flight(redis)).values()) == 2000

    await redis.until(full, QUEUE, IN_FLIGHT)
    await clients.connect(n1, "alice")  # room_started and participant_joined: no room for them

    async def dropped() -> bool:
        return int(await redis.command("GET", "sig:wh:dropped") or 0) == 2

    await redis.until(dropped, "sig:wh:dropped")

    async def counted() -> bool:
        return all([await node.metric("signal_webhook_cluster_events_dropped_total") == 2 for node in (n1, n2)])

    # Polled: each node copies the Redis counter into its gauge on its next idle take, unannounced.
    await poll_until(counted)
    assert await n2.metric("signal_webhook_cluster_queue") == 10_000
    assert int(await redis.command("GET", "sig:wh:dropped")) == 2


async def test_after_an_empty_redis_restart_the_outage_leaves_and_ends_are_sent(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, receiver: Receiver
) -> None:
    """Redis restarts empty (switch and queue gone). Webhooks resume, the leaves of
    the outage are sent with their reason, a room they emptied finishes; the members
    the backend knows are not announced again, and a room another node re-registers
    later is not finished."""
    n1, n2 = await start_nodes(2, *hooks(receiver), grace=30)
    alice = await clients.connect(n1, "alice", "room-1")
    carol = await clients.connect(n1, "carol", "room-2")
    bob = await clients.connect(n2, "bob", "room-1")
    await clients.connect(n2, "dave", "room-3")
    await alice.expect("user_joined")
    assert len(await receiver.take(7)) == 7

    await redis.stop()
    for node in (n1, n2):
        await node.wait_ready(False, timeout=2.5)
    await alice.ws.close()
    await carol.ws.close()

    for room, user in (("room-1", "alice"), ("room-2", "carol")):  # logged once the leave is done
        await n1.line_matching(rf"close room={room} user={user} clean=True")
    assert await n1.metric('signal_leaves_total{reason="left"}') == 2
    n2.signal(signal.SIGSTOP)  # node 1 re-registers first: room-1 is empty in Redis for a while
    try:
        await redis.start()  # empty
        assert sorted(summary(await receiver.take(2))) == [
            ("participant_left", "room-1", "alice", "left"), ("participant_left", "room-2", "carol", "left"),
        ]
    finally:
        n2.signal(signal.SIGCONT)
    assert summary(await receiver.take(1, timeout=15)) == [("room_finished", "room-2", None, None)]

    await n1.wait_ready()  # joins wait for readiness after an outage, as a balancer would
    erin = await clients.connect(n1, "erin", "room-4")  # webhooks go on; nothing else was sent meanwhile
    await erin.ws.close()
    assert by_room(await receiver.take(4)) == {"room-4": [
        ("room_started", "room-4", None, None), ("participant_joined", "room-4", "erin", None),
        ("participant_left", "room-4", "erin", "left"), ("room_finished", "room-4", None, None),
    ]}
    await bob.ws.close()  # room-1 lived on through node 2's re-registration: it finishes now, once
    assert summary(await receiver.take(2)) == [
        ("participant_left", "room-1", "bob", "left"), ("room_finished", "room-1", None, None),
    ]
    assert len({event["id"] for event in receiver.events}) == len(receiver.events) == 16
    assert receiver.rejected == 0
