"""The room service API on one node: admin grant, list, show, kick (with ban), close, server messages."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from signal_server import hub as hub_module
from signal_server.context import SIGNALING

from .conftest import SECRET, TIMEOUT, Connect, Member, connector, join_all, make_token
from .test_hardening import close_code, raw

ADMIN = {"Authorization": f"Bearer {make_token('backend', admin=True)}"}


def admin_headers(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token('backend', **claims)}"}


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, (response.status, await response.text())
    body: dict[str, Any] = await response.json()
    assert body["error"] == code and body["message"].startswith(code + ": "), body
    return body


async def test_list_and_show_rooms(client: TestClient[Any, Any], connect: Connect) -> None:
    before = time.time()
    await join_all(connect, "alice", "bob")
    response = await client.get("/webrtc/rooms", headers=ADMIN)
    assert response.status == 200
    rooms = (await response.json())["rooms"]
    assert [(r["room_id"], r["participants"]) for r in rooms] == [("room-1", 2)]
    assert before - 1 <= rooms[0]["created_at"] <= time.time() + 1
    response = await client.get("/webrtc/rooms/room-1", headers=ADMIN)
    body = await response.json()
    assert body["room_id"] == "room-1"
    assert [(p["user_id"], p["username"], p["state"], p["node"]) for p in body["participants"]] == [
        ("alice", "alice", "live", None), ("bob", "bob", "live", None),
    ]
    assert all(before - 1 <= p["joined_at"] <= time.time() + 1 for p in body["participants"])
    await error_of(await client.get("/webrtc/rooms/nowhere", headers=ADMIN), 404, "NOT_FOUND")


async def vanish(client: TestClient[Any, Any], member: Member) -> None:
    """``member``'s connection ends without a close frame (a drop, not a leave); returns once
    the server has handled that, so the slot is held from then on. The server notices a drop on
    its own time: the moment is its hub's drop finishing, which this wraps for the one call."""
    hub = client.app[SIGNALING].hub
    drop = hub.drop
    handled = asyncio.Event()

    async def noting(slot: Any, peer: Any) -> None:
        await drop(slot, peer)
        if slot.user_id == member.user:
            handled.set()

    hub.drop = noting
    try:
        member.ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await asyncio.wait_for(handled.wait(), TIMEOUT)
    finally:
        del hub.drop  # the class's method again


async def test_a_dropped_participant_is_shown_held(client: TestClient[Any, Any], connect: Connect) -> None:
    alice, bob = await join_all(connect, "alice", "bob")
    await vanish(client, bob)
    body = await (await client.get("/webrtc/rooms/room-1", headers=ADMIN)).json()
    assert {p["user_id"]: p["state"] for p in body["participants"]} == {"alice": "live", "bob": "held"}


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "UNAUTHORIZED"),
        ({"Authorization": "Bearer nonsense"}, 401, "UNAUTHORIZED"),
        (admin_headers(), 403, "FORBIDDEN"),  # a participant's token
        (admin_headers(admin="true"), 403, "FORBIDDEN"),  # not the boolean true
        (admin_headers(admin=1), 403, "FORBIDDEN"),
        (admin_headers(admin=True, ttl=-60), 401, "UNAUTHORIZED"),  # expired
        ({"Authorization": "Bearer " + make_token("backend", admin=True, secret="x" * 40)}, 401, "UNAUTHORIZED"),
    ],
)
async def test_the_api_needs_a_valid_admin_grant(
    client: TestClient[Any, Any], connect: Connect, headers: dict[str, str], status: int, code: str
) -> None:
    alice = await connect("alice")
    for method, path in (
        ("GET", "/webrtc/rooms"), ("GET", "/webrtc/rooms/room-1"),
        ("DELETE", "/webrtc/rooms/room-1/participants/alice"), ("DELETE", "/webrtc/rooms/room-1"),
        ("POST", "/webrtc/rooms/room-1/messages"),
    ):
        response = await client.request(method, path, headers=headers, json={"payload": {}})
        await error_of(response, status, code)
        if status == 401:
            assert "Bearer" in response.headers["WWW-Authenticate"]
    await alice.send("ping")
    await alice.expect("pong")  # nothing happened to her


async def test_two_credentials_are_refused_whichever_comes_first(
    client: TestClient[Any, Any], connect: Connect
) -> None:
    """Authorization is a singleton header: with two, a proxy in front may judge one while
    we act on the other. Two are refused (as are two ?token= on the WebSocket)."""
    admin, participant = ADMIN["Authorization"], f"Bearer {make_token('alice')}"
    for first, second in ((admin, participant), (participant, admin)):
        twice = CIMultiDict([("Authorization", first), ("Authorization", second)])
        for path in ("/webrtc/rooms", "/webrtc/config"):
            body = await error_of(await client.get(path, headers=twice), 401, "UNAUTHORIZED")
            assert "Authorization" in body["message"], body
    alice = await connect("alice", join=False, token=f"{make_token('alice')}&token={make_token('mallory')}")
    assert "token" in (await alice.expect_error("UNAUTHORIZED"))["payload"]["message"]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_alg_none_and_key_confusion_are_refused(client: TestClient[Any, Any]) -> None:
    now = int(time.time())
    claims = {"sub": "backend", "admin": True, "iat": now, "exp": now + 60}
    unsigned = jwt.encode(claims, "", algorithm="none")
    hs512 = jwt.encode(claims, SECRET, algorithm="HS512")  # not the configured algorithm
    for token in (unsigned, hs512):
        response = await client.get("/webrtc/rooms", headers={"Authorization": f"Bearer {token}"})
        await error_of(response, 401, "UNAUTHORIZED")


async def test_an_admin_token_limited_to_rooms(client: TestClient[Any, Any], connect: Connect) -> None:
    await connect("alice", "room-1")
    await connect("bob", "room-2")
    limited = admin_headers(admin=True, rooms=["room-2"])
    rooms = (await (await client.get("/webrtc/rooms", headers=limited)).json())["rooms"]
    assert [room["room_id"] for room in rooms] == ["room-2"]
    await error_of(await client.delete("/webrtc/rooms/room-1", headers=limited), 403, "FORBIDDEN")


async def test_kick_with_ban(client: TestClient[Any, Any], connect: Connect) -> None:
    alice, bob, carol = await join_all(connect, "alice", "bob", "carol")
    response = await client.delete("/webrtc/rooms/room-1/participants/bob?ban=60", headers=ADMIN)
    assert response.status == 200, await response.text()
    assert await response.json() == {"room_id": "room-1", "user_id": "bob", "removed": True, "ban": 60}
    await bob.expect_error("KICKED")
    await bob.expect_close(4411)
    for other in (alice, carol):
        left = await other.expect("user_left")
        assert left["payload"] == {"user_id": "bob", "username": "bob", "reason": "kicked"}
    # The slot was freed at once: no held bob.
    body = await (await client.get("/webrtc/rooms/room-1", headers=ADMIN)).json()
    assert [p["user_id"] for p in body["participants"]] == ["alice", "carol"]
    again = await connect("bob", join=False)
    await again.expect_error("FORBIDDEN")
    await again.expect_close(4403)
    other_room = await connect("bob", "room-2")  # the ban is for that room only
    await other_room.send("ping")
    await other_room.expect("pong")
    await error_of(
        await client.delete("/webrtc/rooms/room-1/participants/bob", headers=ADMIN), 404, "NOT_FOUND"
    )


async def test_a_kicked_connection_relays_nothing_it_had_already_sent(
    client: TestClient[Any, Any], connect: Connect
) -> None:
    """Frames the kicked client sent before the kick, already read by the server, are
    not relayed after it: nobody gets an offer from a user they were told has left."""
    hub = client.app[SIGNALING].hub
    alice = await connect("alice")
    route, routed_after_kick = hub.route, []

    def kick_on_first_offer(slot: Any, kind: str, payload: Any, target: Any) -> Any:
        if slot.user_id == "mallory" and hub.rooms["room-1"].slots.get("mallory") is not slot:
            routed_after_kick.append(payload["sdp"])
        result = route(slot, kind, payload, target)
        if payload["sdp"] == "0":  # kicked right after it, with offers 1-4 read already
            with pytest.raises(StopIteration):
                hub.kick("room-1", "mallory").send(None)  # no await inside on one node
        return result

    hub.route = kick_on_first_offer
    mallory = await raw(client, "mallory")
    await mallory.expect("room_state")
    await alice.expect("user_joined")
    offers = [{"type": "offer", "payload": {"type": "offer", "sdp": str(n)}} for n in range(5)]
    mallory.writer.write(b"".join(mallory._frame(0x1, json.dumps(offer).encode()) for offer in offers))
    assert await close_code(mallory) == 4411
    assert (await alice.expect("offer"))["payload"]["sdp"] == "0"
    assert (await alice.expect("user_left"))["payload"]["reason"] == "kicked"
    await alice.send("ping")
    await alice.expect("pong")  # nothing from mallory in between
    assert routed_after_kick == []
    await mallory.aclose()


def after_the_grace(monkeypatch: pytest.MonkeyPatch, grace: float = 20.0) -> None:
    """The hub's clock jumps past the reconnect grace (default 20 s)."""
    later = time.monotonic() + grace + 1
    monkeypatch.setattr(hub_module, "time", SimpleNamespace(monotonic=lambda: later, time=time.time))


async def test_kick_without_ban_lets_the_user_back_after_the_grace(
    client: TestClient[Any, Any], connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = await join_all(connect, "alice", "bob")
    assert (await client.delete("/webrtc/rooms/room-1/participants/bob", headers=ADMIN)).status == 200
    await bob.expect_error("KICKED")
    await alice.expect("user_left")
    # Within the grace a join of bob is his client's reconnect as far as the server can
    # tell (a connection it thought live may have been half-open): told KICKED again.
    again = await connect("bob", join=False)
    await again.expect_error("KICKED")
    await again.expect_close(4411)
    after_the_grace(monkeypatch)
    back = await connect("bob")
    await back.send("ping")
    await back.expect("pong")
    assert (await alice.expect("user_joined"))["payload"]["user_id"] == "bob"


async def test_a_participant_kicked_while_disconnected_is_told_on_its_reconnect(app_client: Any) -> None:
    """Its slot was held (no close frame): the kick removes it, and the reconnect its client
    makes is answered KICKED, not let in as a fresh join that undoes the kick."""
    client = await app_client(reconnect_grace=60)
    connect = connector(client)
    alice, mallory = await join_all(connect, "alice", "mallory")
    await vanish(client, mallory)  # held, not left
    assert await held(client, "mallory")
    assert (await client.delete("/webrtc/rooms/room-1/participants/mallory", headers=ADMIN)).status == 200
    assert (await alice.expect("user_left"))["payload"]["reason"] == "kicked"
    back = await connect("mallory", join=False)
    await back.expect_error("KICKED")
    await back.expect_close(4411)
    body = await (await client.get("/webrtc/rooms/room-1", headers=ADMIN)).json()
    assert [p["user_id"] for p in body["participants"]] == ["alice"]
    await alice.send("ping")
    await alice.expect("pong")  # no user_joined for mallory


async def test_the_ban_ends(
    client: TestClient[Any, Any], connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = await connect("bob")
    assert (await client.delete("/webrtc/rooms/room-1/participants/bob?ban=30", headers=ADMIN)).status == 200
    await bob.expect_error("KICKED")
    refused = await connect("bob", join=False)
    message = await refused.expect_error("FORBIDDEN")
    assert "for another 30 s" in message["payload"]["message"]
    # 31 seconds later, as the hub's clock sees it:
    later = time.monotonic() + 31
    monkeypatch.setattr(hub_module, "time", SimpleNamespace(monotonic=lambda: later, time=time.time))
    back = await connect("bob")
    await back.send("ping")
    await back.expect("pong")


async def test_close_room(client: TestClient[Any, Any], connect: Connect) -> None:
    alice, bob = await join_all(connect, "alice", "bob")
    response = await client.delete("/webrtc/rooms/room-1?ban=60", headers=ADMIN)
    assert response.status == 200, await response.text()
    for member in (alice, bob):
        await member.expect_error("ROOM_CLOSED")
        await member.expect_close(4412)
    assert (await (await client.get("/webrtc/rooms", headers=ADMIN)).json())["rooms"] == []
    refused = await connect("carol", join=False)
    await refused.expect_error("FORBIDDEN")
    await error_of(await client.delete("/webrtc/rooms/room-1", headers=ADMIN), 404, "NOT_FOUND")


async def test_a_closed_room_without_ban_reopens(
    client: TestClient[Any, Any], connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await connect("alice")
    assert (await client.delete("/webrtc/rooms/room-1", headers=ADMIN)).status == 200
    await alice.expect_error("ROOM_CLOSED")
    carol = await connect("carol")  # anyone who was not in it: a new room at once
    refused = await connect("alice", join=False)  # its member, within the grace: still closed
    await refused.expect_error("ROOM_CLOSED")
    await refused.expect_close(4412)
    after_the_grace(monkeypatch)
    again = await connect("alice")
    await again.send("ping")
    await again.expect("pong")
    assert (await carol.expect("user_joined"))["payload"]["user_id"] == "alice"


async def held(client: TestClient[Any, Any], user: str) -> bool:
    """Whether the admin API shows ``user``'s slot in room-1 held."""
    body = await (await client.get("/webrtc/rooms/room-1", headers=ADMIN)).json()
    return any(p["user_id"] == user and p["state"] == "held" for p in body["participants"])


async def test_a_closed_room_holds_no_slot_and_is_not_reopened_by_a_reconnect(app_client: Any) -> None:
    """bob's slot was held when the room closed: his client's reconnect is told ROOM_CLOSED
    (it used to re-create the room that the backend had just closed)."""
    client = await app_client(reconnect_grace=60)
    connect = connector(client)
    alice, bob = await join_all(connect, "alice", "bob")
    await vanish(client, bob)
    assert await held(client, "bob")
    assert (await client.delete("/webrtc/rooms/room-1", headers=ADMIN)).status == 200
    await alice.expect_error("ROOM_CLOSED")
    assert (await (await client.get("/webrtc/rooms", headers=ADMIN)).json())["rooms"] == []
    back = await connect("bob", join=False)
    await back.expect_error("ROOM_CLOSED")
    await back.expect_close(4412)
    assert (await (await client.get("/webrtc/rooms", headers=ADMIN)).json())["rooms"] == []


async def test_server_messages(client: TestClient[Any, Any], connect: Connect) -> None:
    alice, bob = await join_all(connect, "alice", "bob")
    payload = {"text": "the meeting ends in 5 minutes", "nested": {"a": [1, 2]}}
    response = await client.post("/webrtc/rooms/room-1/messages", headers=ADMIN, json={"payload": payload})
    assert response.status == 200, await response.text()
    for member in (alice, bob):
        message = await member.expect("server_message")
        assert message["payload"] == payload
        assert message["sender_id"] == "" and message["room_id"] == "room-1"
    response = await client.post(
        "/webrtc/rooms/room-1/messages", headers=ADMIN, json={"payload": {"to": "bob"}, "target_user_id": "bob"}
    )
    assert response.status == 200
    assert (await bob.expect("server_message"))["payload"] == {"to": "bob"}
    await alice.send("ping")
    await alice.expect("pong")  # alice got nothing in between
    await error_of(
        await client.post(
            "/webrtc/rooms/room-1/messages", headers=ADMIN, json={"payload": {}, "target_user_id": "zed"}
        ),
        404, "NOT_FOUND",
    )
    await error_of(
        await client.post("/webrtc/rooms/nowhere/messages", headers=ADMIN, json={"payload": {}}), 404, "NOT_FOUND"
    )


async def test_a_server_message_to_a_held_participant_is_kept_or_refused(app_client: Any) -> None:
    """Kept for the resume like relayed messages (the answer says held); past the kept
    bounds refused with 409 NOT_DELIVERED, and the resume says recovered false."""
    client = await app_client(reconnect_grace=30, kept_messages=2)
    connect = connector(client)
    alice, bob = await join_all(connect, "alice", "bob")
    await vanish(client, bob)  # held
    await alice.send("ping")
    await alice.expect("pong")

    async def send(user: str, text: str) -> Any:
        return await client.post(
            "/webrtc/rooms/room-1/messages", headers=ADMIN, json={"payload": {"text": text}, "target_user_id": user}
        )

    assert await held(client, "bob")
    response = await send("bob", "one")
    assert response.status == 200 and await response.json() == {"room_id": "room-1", "sent": True, "held": True}
    back = await connect("bob", join=False)
    state = await back.expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is True
    assert (await back.expect("server_message"))["payload"] == {"text": "one"}
    assert await (await send("bob", "live")).json() == {"room_id": "room-1", "sent": True, "held": False}
    assert (await back.expect("server_message"))["payload"] == {"text": "live"}

    carol = await connect("carol")  # has read nothing a resume would have to replay
    await vanish(client, carol)
    assert await held(client, "carol")
    for text in ("a", "b"):
        assert (await send("carol", text)).status == 200
    body = await error_of(await send("carol", "c"), 409, "NOT_DELIVERED")  # past --kept-messages
    assert "recovered: false" in body["message"]
    await error_of(await send("carol", "d"), 409, "NOT_DELIVERED")
    state = await (await connect("carol", join=False)).expect("room_state")
    assert state["payload"]["resumed"] is True and state["payload"]["recovered"] is False


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "INVALID_REQUEST"),
        (b"[1, 2]", 400, "INVALID_REQUEST"),
        (b'{"payload": "text"}', 400, "INVALID_REQUEST"),
        (b'{"payload": {}, "target_user_id": 7}', 400, "INVALID_REQUEST"),
        (b'{"payload": {}, "target_user_id": ""}', 400, "INVALID_REQUEST"),
        (b'{"payload": {}, "target_user_id": "a\\nb"}', 400, "INVALID_REQUEST"),
        (b'{"payload": {}, "sender_id": "alice"}', 400, "INVALID_REQUEST"),
        (b'{"payload": ' + json.dumps(_deep(40)).encode() + b"}", 400, "INVALID_REQUEST"),
        (b'{"payload": {"x": "' + b"a" * 70000 + b'"}}', 413, "MESSAGE_TOO_LARGE"),
    ],
)
async def test_bad_message_bodies(
    client: TestClient[Any, Any], connect: Connect, body: bytes, status: int, code: str
) -> None:
    alice = await connect("alice")
    response = await client.post(
        "/webrtc/rooms/room-1/messages", headers={**ADMIN, "Content-Type": "application/json"}, data=body
    )
    await error_of(response, status, code)
    await alice.send("ping")
    await alice.expect("pong")  # she was sent nothing


async def test_a_chunked_body_is_bounded_too(client: TestClient[Any, Any], connect: Connect) -> None:
    await connect("alice")

    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post("/webrtc/rooms/room-1/messages", headers=ADMIN, data=chunks())
    await error_of(response, 413, "MESSAGE_TOO_LARGE")


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/webrtc/rooms/a%20b", "INVALID_ROOM"),
        ("GET", "/webrtc/rooms/" + "r" * 65, "INVALID_ROOM"),
        ("DELETE", "/webrtc/rooms/room-1/participants/" + "u" * 129, "INVALID_REQUEST"),
        ("DELETE", "/webrtc/rooms/room-1/participants/a%00b", "INVALID_REQUEST"),
        ("DELETE", "/webrtc/rooms/room-1/participants/alice?ban=-1", "INVALID_REQUEST"),
        ("DELETE", "/webrtc/rooms/room-1/participants/alice?ban=1e9", "INVALID_REQUEST"),
        ("DELETE", "/webrtc/rooms/room-1/participants/alice?ban=1&ban=2", "INVALID_REQUEST"),
        ("DELETE", "/webrtc/rooms/room-1?ban=99999999999", "INVALID_REQUEST"),
    ],
)
async def test_bad_paths_and_bans(
    client: TestClient[Any, Any], connect: Connect, method: str, path: str, code: str
) -> None:
    alice = await connect("alice")
    await error_of(await client.request(method, path, headers=ADMIN), 400, code)
    await alice.send("ping")
    await alice.expect("pong")  # still there


async def test_the_api_is_under_the_mount_prefix(aiohttp_client: Any) -> None:
    from aiohttp import web

    from signal_server import create_app

    from .conftest import make_settings

    host = web.Application()
    host.add_subapp("/rtc", create_app(make_settings()))
    client = await aiohttp_client(host)
    response = await client.get("/rtc/rooms", headers=ADMIN)
    assert response.status == 200 and await response.json() == {"rooms": []}


async def test_participants_cannot_pose_as_the_server(connect: Connect) -> None:
    """A client cannot send server_message, nor make its messages carry sender_id "" (the server's)."""
    alice, bob = await join_all(connect, "alice", "bob")
    await alice.ws.send_str(json.dumps({"type": "server_message", "payload": {"x": 1}, "sender_id": ""}))
    await alice.expect_error("UNSUPPORTED_TYPE")
    await alice.ws.send_str(json.dumps({
        "type": "offer", "payload": {"type": "offer", "sdp": "v=0", "sender_id": ""}, "sender_id": "",
    }))
    offer = await bob.expect("offer")
    assert offer["sender_id"] == "alice" and offer["payload"]["sender_id"] == "alice"
