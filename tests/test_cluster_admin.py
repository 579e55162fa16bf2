"""The room service API across three real nodes on one real redis-server.

A request through any node acts on participants wherever they are: the
registry in Redis decides, and the events reach the node holding the slot.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientSession, WSMsgType
from aiohttp.test_utils import TestClient

from signal_server.context import SIGNALING

from . import test_cluster
from .cluster import Clients, Node, RedisServer, poll_until
from .conftest import TIMEOUT, connector, make_token
from .test_cluster import GRACE, AppClient, StartNodes
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


async def test_close_with_ban_across_nodes_then_reopen(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer
) -> None:
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
    await clients.connect(n3, "carol", "room-2")  # a fresh room: room_state, not a refusal
    status, body = await api(n1, "GET", "/rooms/room-2")
    assert [(p["user_id"], p["node"]) for p in body["participants"]] == [("carol", "n3")]
    # Its former members are told ROOM_CLOSED for the grace, on every node (their clients'
    # automatic reconnects must not reopen it); no ban: the refusal ends with the grace.
    for node in (n1, n2):
        again = await clients.connect(node, "alice", "room-2", join=False)
        await again.expect_error("ROOM_CLOSED")
        await again.expect_close(4412)
    assert 0 < int(await redis.command("PTTL", "sig:{room-2}:out:alice")) <= GRACE * 1000


async def test_a_participant_kicked_while_disconnected_is_told_on_its_reconnect(
    start_nodes: StartNodes, clients: Clients, redis: RedisServer
) -> None:
    """bob's slot is held on node 2 (no close frame) when node 1 kicks him: the reconnect his
    client makes, through any node, is answered KICKED for the grace, not let in afresh."""
    n1, n2, n3 = await start_nodes(3, grace=30)
    alice = await clients.connect(n1, "alice")
    bob = await test_cluster.raw_client(n2, "bob")
    await alice.expect("user_joined")
    bob.abort()
    await test_cluster.held_on(redis, "room-1", "bob")
    assert (await api(n1, "DELETE", "/rooms/room-1/participants/bob"))[0] == 200
    assert (await alice.expect("user_left"))["payload"]["reason"] == "kicked"
    for node in (n3, n2):
        back = await clients.connect(node, "bob", join=False)
        await back.expect_error("KICKED")
        await back.expect_close(4411)
    assert 0 < int(await redis.command("PTTL", "sig:{room-1}:out:bob")) <= 30_000
    await test_cluster.quiet(alice)  # no user_joined for bob
    status, body = await api(n3, "GET", "/rooms/room-1")
    assert [p["user_id"] for p in body["participants"]] == ["alice"]


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

    await test_cluster.held_on(redis, "room-1", "bob")  # the API reads the registry
    assert await state_of("bob") == "held"
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

    # Polled: Redis announces no (un)subscription; only PUBSUB NUMSUB tells.
    await poll_until(unsubscribed)
    to_carol = {"payload": {"n": 2}, "target_user_id": "carol"}
    status, body = await api(n1, "POST", "/rooms/room-1/messages", json=to_carol)
    assert (status, body.get("error")) == (409, "NOT_DELIVERED"), body

    await test_cluster.held_on(redis, "room-1", "carol")  # found dead: held for the grace
    assert await state_of("carol") == "held"
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
    # The reopened room is one room (for someone new: alice, a member of the closed
    # one, is told ROOM_CLOSED again for the grace).
    dave = await clients.connect(n1, "dave", join=False)
    assert [p["user_id"] for p in (await dave.expect("room_state"))["payload"]["participants"]] == ["bob", "dave"]
    assert (await bob.expect("user_joined"))["payload"]["user_id"] == "dave"
    again = await clients.connect(n1, "alice", join=False)
    await again.expect_error("ROOM_CLOSED")


async def in_process_node(redis: RedisServer, app_client: AppClient) -> tuple[TestClient[Any, Any], Any]:
    """Node b in this process (its hub reachable, to hold back a reply or an event), once ready."""
    node = await test_cluster.in_process_node(redis, app_client, reconnect_grace=GRACE)
    return node, node.app[SIGNALING].hub


@pytest.mark.parametrize("event_first", [True, False], ids=["event-first", "reply-first"])
@pytest.mark.parametrize("emptied_by", ["close", "kick", "reap"])
async def test_a_room_emptied_while_a_join_is_in_flight_leaves_no_ghost(
    redis: RedisServer, start_nodes: StartNodes, clients: Clients, app_client: AppClient,
    emptied_by: str, event_first: bool,
) -> None:
    """Redis empties the room (a close through node A, a kick of its last member, the reap of
    its held last member), then runs a JOIN from node B, whose mirror still holds the old room;
    the news of the emptying reaches B before, or after, the JOIN's reply. Versions never go
    backwards for a room name, so B applies that news to the old slots only: the join stays,
    Redis lists exactly who is connected, and B hears what follows (it had ignored joins whose
    version was below its stale one, and closed the new slot without releasing its record)."""
    (node_a,) = await start_nodes(1)
    node_b, hub = await in_process_node(redis, app_client)
    old = await connector(node_b)("old")
    for index in range(3):  # the room's version climbs past what a fresh room would start at
        passer = await clients.connect(node_a, f"passer{index}")
        await passer.ws.close()
        await old.expect("user_joined")
        await old.expect("user_left")
    joiner_id = "old" if emptied_by == "reap" else "new"  # a reap races the resume of the reaped user
    if emptied_by == "reap":
        old.ws._response.connection.transport.abort()  # type: ignore[union-attr]  # held for the grace
        await test_cluster.held_on(redis, "room-1", "old")

    async def empty_the_room() -> None:
        if emptied_by == "close":
            assert (await api(node_a, "DELETE", "/rooms/room-1"))[0] == 200
        elif emptied_by == "kick":
            assert (await api(node_a, "DELETE", "/rooms/room-1/participants/old"))[0] == 200
        else:
            async def reaped() -> bool:
                return await test_cluster.record(redis, "room-1", "old") is None

            await redis.until(reaped, test_cluster.members_key("room-1"))

    call, on_message = hub.link.call, hub.link._on_message
    armed, heard = asyncio.Event(), asyncio.Event()
    held_back: list[bytes] = []

    async def join_after_the_room_emptied(name: str, *args: Any) -> Any:
        if name != "JOIN" or args[1] != joiner_id:
            return await call(name, *args)
        armed.set()
        await empty_the_room()
        reply = await call(name, *args)
        if event_first:  # Redis ran the JOIN; the emptying's event is applied before its reply
            await release_the_event()
        return reply

    async def release_the_event() -> None:
        await asyncio.wait_for(heard.wait(), TIMEOUT)
        for data in held_back:
            on_message(data)

    def hearing(data: bytes) -> None:
        if armed.is_set() and not heard.is_set() and data[:1] in (b"x", b"l"):
            heard.set()
            held_back.append(data)
            return
        on_message(data)

    hub.link.call, hub.link._on_message = join_after_the_room_emptied, hearing
    joiner = await connector(node_b)(joiner_id, join=False)
    await joiner.expect("room_state")
    if not event_first:  # applied once the joiner has its room_state
        await release_the_event()
    if emptied_by != "reap":
        code = "ROOM_CLOSED" if emptied_by == "close" else "KICKED"
        message = await old.recv()
        if not event_first:  # B admitted the joiner before it heard that old was gone
            assert message["type"] == "user_joined" and message["payload"]["user_id"] == "new", message
            message = await old.recv()
        assert message["type"] == "error" and message["payload"]["code"] == code, message
        await old.expect_close(4412 if emptied_by == "close" else 4411)
    await test_cluster.quiet(joiner)  # still in the room
    found = await test_cluster.record(redis, "room-1", joiner_id)
    assert found is not None and found["n"] == "b" and found["h"] == 0

    late = await clients.connect(node_a, "late", join=False)
    assert test_cluster.users(await late.expect("room_state")) == [joiner_id, "late"]
    assert (await joiner.expect("user_joined"))["payload"]["user_id"] == "late"
    await joiner.ws.close()
    assert (await late.expect("user_left"))["payload"]["user_id"] == joiner_id
    status, body = await api(node_a, "GET", "/rooms/room-1")
    assert status == 200 and [p["user_id"] for p in body["participants"]] == ["late"]


async def test_a_slot_dropped_on_news_from_the_registry_never_leaves_its_record(
    redis: RedisServer, app_client: AppClient
) -> None:
    """Whatever news makes a node drop a slot (here a close event it is handed directly, as if
    one meant for an older room had been applied to this slot), Redis does not keep a record
    of a slot that no longer exists: the node releases it."""
    node, hub = await in_process_node(redis, app_client)
    alice = await connector(node)("alice")
    assert await test_cluster.record(redis, "room-1", "alice") is not None
    hub._on_message(b'x{"r":"room-1","v":1000000}\n')
    await alice.expect_error("ROOM_CLOSED")

    async def released() -> bool:
        return await test_cluster.record(redis, "room-1", "alice") is None

    await redis.until(released, test_cluster.members_key("room-1"))
