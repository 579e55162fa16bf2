"""Order across a move: a client resumed through another node never sees a message
after one its sender sent later (the failover benchmark's displaced clients).

Real nodes on one real redis-server; a node in this process when the test must hold
its command writer or its subscriber at a chosen point (never a sleep).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from . import test_cluster
from .cluster import RedisServer
from .conftest import TIMEOUT, connector
from .test_cluster import (
    AppClient,
    StartNodes,
    hub_of,
    in_process_nodes,
    offer_for,
    offers_waiting_in_the_old_node,
    quiet,
    raw_client,
    resume_and_send_straight,
    watch,
)

# The cluster tests' fixtures (a redis-server, nodes, WebSocket clients), shared.
redis = test_cluster.redis
start_nodes = test_cluster.start_nodes
clients = test_cluster.clients


class HeldWriter:
    """Holds a node's command writer: what the node queues for Redis meanwhile waits, in
    order, and goes out together (one pipeline) on ``release``. Its link stays up: nothing
    is written, so nothing is overdue."""

    def __init__(self, hub: Any) -> None:
        self._event: asyncio.Event = hub.link._wake
        self._released = asyncio.Event()
        self.holding = asyncio.Event()
        self._queued = asyncio.Event()
        hub.link._wake = self

    @classmethod
    async def hold(cls, hub: Any) -> HeldWriter:
        """Returns once the writer has sent what was queued before and waits here."""
        held = cls(hub)
        held._event.set()  # the writer, waiting on the original event, comes round to this one
        await held.holding.wait()
        return held

    def set(self) -> None:
        """The node queued a command (it wakes its writer with each one)."""
        self._event.set()
        self._queued.set()

    async def queued_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate`` holds, looked at again after each command the node queues."""
        async with asyncio.timeout(TIMEOUT * 2):
            while not predicate():
                self._queued.clear()
                await self._queued.wait()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        self.holding.set()
        await self._released.wait()
        await self._event.wait()

    def release(self) -> None:
        self._released.set()


async def offers(member: Any, count: int) -> list[str]:
    return [(await member.expect("offer"))["payload"]["sdp"] for _ in range(count)]


async def test_a_message_that_found_nobody_on_a_dead_node_waits_for_the_resume_in_flight_here(
    redis: RedisServer, start_nodes: StartNodes, app_client: AppClient
) -> None:
    """alice's node A is killed; she resumes through node C, where bob is. bob's "1" was queued
    for A before her JOIN, "2" after it (held on C for her). Redis runs both in one pipeline:
    the publish of "1" finds nobody, then the JOIN. C now keeps "1" for her resume instead of
    asking the registry to forward it (which forwarded it after she had been given "2")."""
    (node_a,) = await start_nodes(1, grace=10.0, prefix="a")
    (node_c,) = await in_process_nodes(app_client, redis, "c")
    hub = hub_of(node_c)
    bob = await connector(node_c)("bob")
    alice = await raw_client(node_a, "alice")
    await bob.expect("user_joined")
    await node_a.kill()
    alice.abort()
    writer = await HeldWriter.hold(hub)
    try:
        await bob.offer(sdp="1", target_user_id="alice")  # for A: queued behind the held writer
        await quiet(bob)
        resumed = await connector(node_c)("alice", join=False)  # its JOIN queued after "1"

        def joining() -> bool:
            room = hub.rooms.get("room-1")
            return room is not None and "alice" in room.inflight

        await writer.queued_until(joining)  # her JOIN is queued once it is in flight
        await bob.offer(sdp="2", target_user_id="alice")  # waits on C for her resume
        await quiet(bob)
    finally:
        writer.release()
    state = await resumed.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False  # her node died
    await bob.offer(sdp="3", target_user_id="alice")
    assert await offers(resumed, 3) == ["1", "2", "3"]
    await quiet(resumed)


async def test_a_forward_through_the_old_node_after_an_incomplete_hand_off_is_dropped(
    redis: RedisServer, app_client: AppClient
) -> None:
    """bob's offers b0-b2 to alice (held on A) sit in A's subscriber; she resumes through C, whose
    hand-off barriers cannot come (bob's marker waits behind them), so after the wait C says
    recovered false and gives her b3, which bob sent straight to C. When A catches up it forwards
    b0-b2 through the registry: they were sent before b3, so C drops them instead of delivering
    them after it (the client renegotiates on recovered false; nothing arrives out of order)."""
    _, node_b, node_c, bob, gate = await offers_waiting_in_the_old_node(app_client, redis)
    resumed = await resume_and_send_straight(node_b, node_c, bob)
    state = await resumed.expect("room_state")  # after the hand-off wait: A's barrier is held
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False
    assert await offers(resumed, 1) == ["b3"]
    forwarded = watch(hub_of(node_c), offer_for("b2"))
    gate.open()
    await asyncio.wait_for(forwarded.wait(), 5.0)  # A's forwards reached C
    await bob.offer(sdp="b4", target_user_id="alice")
    assert await offers(resumed, 1) == ["b4"]
    await quiet(resumed)
