"""The room service API across three real nodes on one real redis-server.

A request through any node acts on participants wherever they are: the
registry in Redis decides, and the events reach the node holding the slot.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import ClientSession, WSMsgType

from signal_server.context import SIGNALING

from . import test_cluster
from .cluster import Clients, Node, RedisServer, wait_until
from .conftest import TIMEOUT, connector, make_token
from .test_cluster import AppClient, StartNodes
from .webhook_receiver import WEBHOOK_SECRET, Receiver, summary

# The cluster tests' fixtures (a redis-server, nodes, WebSocket clients), shared.
redis = test_cluster.redis
start_nodes = test_cluster.start_nodes
clients = test_cluster.clients

ADMIN = {"Authorization": f"Bearer {make_token('backend', admin=True)}"}


async def api(node: Node, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with ClientSession() as session:
        async with session.request(method, f"{node.base}/webrtc{path}", headers=ADMIN, **kwargs) as response:
            return response.status, await response.json()


async def test_list_show_kick_with_ban_and_messages_across_nodes(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer
) -> None:
    n1, n2, n3 = await start_nodes(3)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n2, "bob")
    await alice.expect("user_joined")
    carol = await clients.connect(n3, "carol")
    await alice.expect("user_joined")
    await bob.expect("user_joined")

    status, body = await api(n1, "GET", "/rooms")
    assert status == 200
    assert [(room["room_id"], room["participants"]) for room in body["rooms"]] == [("room-1", 3)]
    assert isinstance(body["rooms"][0]["created_at"], float)
    status, body = await api(n2, "GET", "/rooms/room-1")
    assert status == 200
    assert [(p["user_id"], p["state"], p["node"]) for p in body["participants"]] == [
        ("alice", "live", "n1"), ("bob", "live", "n2"), ("carol", "live", "n3"),
    ]

    # A kick through node 1 removes carol from node 3, banned cluster-wide.
    status, body = await api(n1, "DELETE", "/rooms/room-1/participants/carol?ban=60")
    assert status == 200 and body["removed"] is True
    await carol.expect_error("KICKED")
    await carol.expect_close(4411)
    for member in (alice, bob):
        left = await member.expect("user_left")
        assert left["payload"] == {"user_id": "carol", "username": "carol", "reason": "kicked"}
    assert int(await redis.command("PTTL", "sig:{room-1}:ban:carol")) > 50_000
    for node in (n1, n2, n3):  # the ban holds on every node
        again = await clients.connect(node, "carol", join=False)
        await again.expect_error("FORBIDDEN")
        await again.expect_close(4403)
    status, body = await api(n3, "GET", "/rooms/room-1")
    assert [p["user_id"] for p in body["participants"]] == ["alice", "bob"]
    status, body = await api(n3, "DELETE", "/rooms/room-1/participants/carol")
    assert status == 404 and body["error"] == "NOT_FOUND"

    # Server messages through node 3 reach node 1 and node 2.
    status, _ = await api(n3, "POST", "/rooms/room-1/messages", json={"payload": {"text": "hi"}})
    assert status == 200
    for member in (alice, bob):
        message = await member.expect("server_message")
        assert message["payload"] == {"text": "hi"} and message["sender_id"] == ""
    to_bob = {"payload": {"to": "bob"}, "target_user_id": "bob"}
    status, _ = await api(n1, "POST", "/rooms/room-1/messages", json=to_bob)
    assert status == 200
    assert (await bob.expect("server_message"))["payload"] == {"to": "bob"}
    await alice.send("ping")
    await alice.expect("pong")  # nothing for alice
    status, body = await api(n1, "POST", "/rooms/room-1/messages", json={"payload": {}, "target_user_id": "carol"})
    assert status == 404


async def test_close_with_ban_across_nodes_then_reopen(start_nodes: StartNodes, clients: Clients) -> None:
    n1, n2, n3 = await start_nodes(3)
    alice = await clients.connect(n1, "alice")
    bob = await clients.connect(n3, "bob")
    await alice.expect("user_joined")
    status, body = await api(n2, "DELETE", "/rooms/room-1?ban=60")
    assert status == 200 and body["closed"] is True
    for member in (alice, bob):
        await member.expect_error("ROOM_CLOSED")
        await member.expect_close(4412)
    assert (await api(n1, "GET", "/rooms"))[1] == {"rooms": []}
    refused = await clients.connect(n3, "carol", join=False)
    await refused.expect_error("FORBIDDEN")
    assert (await api(n1, "DELETE", "/rooms/room-1"))[0] == 404

    # Without a ban a closed room can be reopened at once, and holds nobody.
    first = await clients.connect(n1, "alice", "room-2")
    second = await clients.connect(n2, "bob", "room-2")
    await first.expect("user_joined")
    assert (await api(n3, "DELETE", "/rooms/room-2"))[0] == 200
    for member in (first, second):
        await member.expect_error("ROOM_CLOSED")
    await clients.connect(n3, "alice", "room-2")  # a fresh room: room_state, not a refusal
    status, body = await api(n1, "GET", "/rooms/room-2")
    assert [(p["user_id"], p["node"]) for p in body["participants"]] == [("alice", "n3")]


async def test_webhooks_across_nodes_each_event_once(start_nodes: StartNodes, clients: Clients) -> None:
    """Join on node 1, join on node 2, resume on node 3, kick through node 1, leave: the exact
    sequence, each event once (whichever node sends it), room_started/finished decided in Redis."""
    receiver = await Receiver().start()
    try:
        hooks = ("--webhook-url", receiver.url, "--webhook-secret", WEBHOOK_SECRET)
        n1, n2, n3 = await start_nodes(3, *hooks, grace=30)
        alice = await clients.connect(n1, "alice")
        assert summary(await receiver.take(2)) == [
            ("room_started", "room-1", None, None), ("participant_joined", "room-1", "alice", None),
        ]
        bob = await clients.connect(n2, "bob")
        await alice.expect("user_joined")
        assert summary(await receiver.take(1)) == [("participant_joined", "room-1", "bob", None)]
        bob.ws._response.connection.transport.abort()  # type: ignore[union-attr]  # held, no event
        await clients.connect(n3, "bob")  # resumed through another node
        assert summary(await receiver.take(1)) == [("participant_resumed", "room-1", "bob", None)]
        assert (await api(n1, "DELETE", "/rooms/room-1/participants/bob"))[0] == 200
        assert summary(await receiver.take(1)) == [("participant_left", "room-1", "bob", "kicked")]
        await alice.ws.close()
        assert summary(await receiver.take(2)) == [
            ("participant_left", "room-1", "alice", "left"), ("room_finished", "room-1", None, None),
        ]
        # A marker room on each node: once its events are in, nothing else is on its way.
        for index, node in enumerate((n1, n2, n3)):
            marker = await clients.connect(node, f"m{index}", f"marker-{index}")
            await marker.ws.close()
        markers = await receiver.take(12)
        expected = sorted(f"marker-{i}" for i in range(3) for _ in range(4))
        assert sorted(event["room_id"] for event in markers) == expected
        assert len({event["id"] for event in receiver.events}) == len(receiver.events) == 19
        assert receiver.rejected == 0
    finally:
        await receiver.close()


async def test_the_api_says_unavailable_without_redis(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer
) -> None:
    (n1,) = await start_nodes(1)
    await clients.connect(n1, "alice")
    await redis.stop()
    for method, path in (
        ("GET", "/rooms"), ("GET", "/rooms/room-1"), ("DELETE", "/rooms/room-1/participants/alice"),
        ("DELETE", "/rooms/room-1"),
    ):
        status, body = await api(n1, method, path)
        assert (status, body["error"]) == (503, "UNAVAILABLE"), (method, path, body)


async def test_a_server_message_to_a_held_participant_on_any_node(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer
) -> None:
    """Held on a live node: kept in Redis for the resume through any node (answer: held).
    On a node that died: nothing can be kept (its resume says recovered false), so the
    API says 409 NOT_DELIVERED, before and after the node is found dead."""
    n1, n2, n3 = await start_nodes(3, grace=30)
    alice = await clients.connect(n1, "alice")
    carol = await clients.connect(n3, "carol")  # kept referenced: its connection stays open
    await alice.expect("user_joined")
    bob = await clients.connect(n2, "bob")  # joins last: has read nothing a resume must replay
    bob.ws._response.connection.transport.abort()  # type: ignore[union-attr]

    async def state_of(user: str) -> str:
        _, body = await api(n1, "GET", "/rooms/room-1")
        return str(next(p["state"] for p in body["participants"] if p["user_id"] == user))

    async def bob_held() -> bool:
        return await state_of("bob") == "held"

    await wait_until(bob_held)
    status, body = await api(n3, "POST", "/rooms/room-1/messages", json={"payload": {"n": 1}, "target_user_id": "bob"})
    assert (status, body) == (200, {"room_id": "room-1", "sent": True, "held": True})
    back = await clients.connect(n1, "bob", join=False)
    state = await back.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert (await back.expect("server_message"))["payload"] == {"n": 1}

    await n3.kill()  # carol's node dies: her slot's frames can no longer be vouched for
    async with asyncio.timeout(TIMEOUT):  # her connection ended with it
        while (await carol.ws.receive()).type is WSMsgType.TEXT:
            pass

    async def unsubscribed() -> bool:  # Redis saw its connection close (not yet found dead)
        return int(list(await redis.command("PUBSUB", "NUMSUB", "sig:ch:n3"))[1]) == 0

    await wait_until(unsubscribed)
    to_carol = {"payload": {"n": 2}, "target_user_id": "carol"}
    status, body = await api(n1, "POST", "/rooms/room-1/messages", json=to_carol)
    assert (status, body.get("error")) == (409, "NOT_DELIVERED"), body

    async def carol_held() -> bool:
        return await state_of("carol") == "held"

    await wait_until(carol_held)  # found dead: held for the grace
    status, body = await api(n2, "POST", "/rooms/room-1/messages", json=to_carol)
    assert (status, body.get("error")) == (409, "NOT_DELIVERED"), body
    again = await clients.connect(n2, "carol", join=False)
    state = await again.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False


async def _node_b(redis: RedisServer, app_client: AppClient) -> tuple[Any, Any]:
    """A node in this process (its hub reachable), with the test nodes' TTL."""
    client = await test_cluster.in_process_node(redis, app_client, reconnect_grace=30.0)
    return client, client.app[SIGNALING].hub


def _hold_joins(hub: Any, *, before: asyncio.Event | None = None) -> tuple[asyncio.Event, asyncio.Event]:
    """Wrap the hub's registry calls: a JOIN waits for ``before`` (if given) to be sent,
    and its reply waits for the returned release event; ``ran`` is set once Redis ran it."""
    call = hub.link.call
    ran, release = asyncio.Event(), asyncio.Event()

    async def held(name: str, *args: Any) -> Any:
        if name != "JOIN":
            return await call(name, *args)
        if before is not None:
            await asyncio.wait_for(before.wait(), TIMEOUT * 2)
        reply = await call(name, *args)
        ran.set()
        await asyncio.wait_for(release.wait(), TIMEOUT * 2)
        return reply

    hub.link.call = held
    return ran, release


def _hearing_close(hub: Any) -> asyncio.Event:
    heard = asyncio.Event()
    on_message = hub.link._on_message

    def hearing(data: bytes) -> None:
        on_message(data)
        if data[:1] == b"x":
            heard.set()

    hub.link._on_message = hearing
    return heard


async def test_a_close_after_a_join_in_flight_closes_the_joiner(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, app_client: AppClient
) -> None:
    """Redis admits bob through node B, then the room is closed through node A; B hears
    the close before it reads the JOIN reply (the first of this room on B). Bob gets his
    room_state, then ROOM_CLOSED and the close: never a live member of a room Redis no
    longer has."""
    (n1,) = await start_nodes(1)
    alice = await clients.connect(n1, "alice")
    node_b, hub = await _node_b(redis, app_client)
    ran, release = _hold_joins(hub)
    heard = _hearing_close(hub)
    bob = await connector(node_b)("bob", join=False)
    await asyncio.wait_for(ran.wait(), TIMEOUT)
    assert (await alice.expect("user_joined"))["payload"]["user_id"] == "bob"
    assert (await api(n1, "DELETE", "/rooms/room-1"))[0] == 200
    await alice.expect_error("ROOM_CLOSED")
    await asyncio.wait_for(heard.wait(), TIMEOUT)
    release.set()
    await bob.expect("room_state")  # admitted (Redis did), then closed like the others
    await bob.expect_error("ROOM_CLOSED")
    await bob.expect_close(4412)
    assert "room-1" not in hub.rooms and hub.slot_count == 0
    assert await redis.command("EXISTS", "sig:{room-1}:m") == 0
    assert (await api(n1, "GET", "/rooms/room-1"))[0] == 404


async def test_a_join_after_a_close_is_admitted_to_the_reopened_room(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer, app_client: AppClient
) -> None:
    """The room (alice on A, carol on B) is closed without a ban before bob's JOIN
    through B reaches Redis: bob opens the room again, and B, which hears the close
    before the JOIN reply, keeps him (in Redis and on B alike) instead of closing him."""
    (n1,) = await start_nodes(1)
    alice = await clients.connect(n1, "alice")
    node_b, hub = await _node_b(redis, app_client)
    carol = await connector(node_b)("carol")
    await alice.expect("user_joined")
    closed = asyncio.Event()
    ran, release = _hold_joins(hub, before=closed)
    heard = _hearing_close(hub)
    bob = await connector(node_b)("bob", join=False)
    assert (await api(n1, "DELETE", "/rooms/room-1"))[0] == 200
    for member in (alice, carol):
        await member.expect_error("ROOM_CLOSED")
    await asyncio.wait_for(heard.wait(), TIMEOUT)
    closed.set()  # bob's JOIN reaches Redis now
    await asyncio.wait_for(ran.wait(), TIMEOUT)
    release.set()
    state = await bob.expect("room_state")
    assert [p["user_id"] for p in state["payload"]["participants"]] == ["bob"]
    await bob.send("ping")
    await bob.expect("pong")
    status, body = await api(n1, "GET", "/rooms/room-1")
    assert status == 200 and [(p["user_id"], p["node"]) for p in body["participants"]] == [("bob", "b")]
    again = await clients.connect(n1, "alice", join=False)  # the reopened room is one room
    assert [p["user_id"] for p in (await again.expect("room_state"))["payload"]["participants"]] == ["bob", "alice"]
    assert (await bob.expect("user_joined"))["payload"]["user_id"] == "alice"
