"""Abuse limits: message rate, slow consumers, connection limits, stalled handshakes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientSession

from signal_server.context import SIGNALING

from .conftest import TIMEOUT, Server, connector, make_token
from .rawws import RawWebSocket


async def metrics_text(client: Any) -> str:
    return str(await (await client.get("/metrics")).text())


async def test_flooder_is_limited_then_closed_while_a_quiet_pair_keeps_relaying(app_client):
    """RATE_LIMITED (at most once a second), then 4429; another pair loses nothing."""
    client = await app_client(rate_limit=20, rate_burst=20)
    connect = connector(client)
    flooder = await connect("mallory", room="flood")
    alice = await connect("alice", room="quiet")
    bob = await connect("bob", room="quiet")
    await alice.expect("user_joined")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for number in range(300):  # bounded: 300 frames, well past 20 + 100 drops
        await flooder.offer(sdp=str(number))
    reports: list[str] = []
    while True:
        message = await asyncio.wait_for(flooder.ws.receive(), TIMEOUT)
        if message.type.name != "TEXT":
            assert message.data == 4429, message
            break
        payload = json.loads(message.data)["payload"]
        assert payload["code"] == "RATE_LIMITED"
        reports.append(payload["message"])
    elapsed = loop.time() - started
    *dropped, final = reports
    assert "sustained" in final  # the fatal report that precedes the 4429 close
    assert 1 <= len(dropped) <= 1 + int(elapsed)  # non-fatal reports: at most one a second
    for number in range(15):  # within the burst: every one arrives, in order
        await alice.offer(sdp=f"a{number}")
        await bob.offer(sdp=f"b{number}")
    assert [(await bob.expect("offer"))["payload"]["sdp"] for _ in range(15)] == [f"a{n}" for n in range(15)]
    assert [(await alice.expect("offer"))["payload"]["sdp"] for _ in range(15)] == [f"b{n}" for n in range(15)]
    text = await metrics_text(client)
    assert 'signal_limit_closes_total{reason="rate_limit"} 1.0' in text
    assert "signal_rate_limited_messages_total" in text and "signal_rate_limited_messages_total 0.0" not in text


async def test_default_limit_lets_fifty_ice_candidates_through(client):
    """The guide's client trickles many candidates at once; the default limit never drops them."""
    connect = connector(client)
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    for number in range(50):
        await bob.send("ice_candidate", candidate=f"candidate:{number}", sdp_mid="0", sdp_m_line_index=0)
    await bob.offer()
    got = [(await alice.expect("ice_candidate"))["payload"]["candidate"] for _ in range(50)]
    assert got == [f"candidate:{n}" for n in range(50)]
    await alice.expect("offer")


async def test_client_that_never_reads_is_closed_while_others_keep_receiving(app_client, monkeypatch):
    """A slow consumer is cut off at its send bound; the sender and other recipients are unaffected."""
    client = await app_client(max_send_buffer=64 * 1024, rate_limit=1e6, rate_burst=10**6, reconnect_grace=30,
        receive_rate=10**9, receive_burst=10**9,
    )
    hub = client.app[SIGNALING].hub
    dropped = asyncio.Event()
    original = hub.drop

    async def drop(slot: Any, peer: Any) -> None:
        await original(slot, peer)
        if slot.user_id == "sloth":
            dropped.set()

    monkeypatch.setattr(hub, "drop", drop)
    connect = connector(client)
    alice = await connect("alice")
    carol = await connect("carol")
    await alice.expect("user_joined")
    sloth = await RawWebSocket.connect(
        client.server.host, client.server.port, f"/webrtc/ws/room-1?token={make_token('sloth')}", read_buffer=4096
    )
    try:
        await sloth.expect("room_state")
        await alice.expect("user_joined")
        await carol.expect("user_joined")
        sdp = "s" * 30_000
        sent = 0
        metrics = hub.metrics
        # Bounded: at most 2,000 x 30 KB; the 64 KiB bound plus kernel buffers trip far sooner.
        while not metrics.limit_closes["slow_consumer"] and sent < 2000:
            await alice.offer(sdp=f"{sent}:{sdp}")
            sent += 1
            assert (await carol.expect("offer"))["payload"]["sdp"].startswith(f"{sent - 1}:")
        assert metrics.limit_closes["slow_consumer"] == 1, sent
        await asyncio.wait_for(dropped.wait(), TIMEOUT)  # and the handler treats it as a drop
        for number in range(3):  # the others are unaffected
            await alice.offer(sdp=f"after {number}")
            assert (await carol.expect("offer"))["payload"]["sdp"] == f"after {number}"
        text = await metrics_text(client)
        assert 'signal_limit_closes_total{reason="slow_consumer"} 1.0' in text
        # The sloth's slot is held like any dropped connection: no user_left.
        await alice.send("ping")
        await alice.expect("pong")
    finally:
        await sloth.aclose()


async def test_connection_limit_per_process(app_client):
    """Past --max-connections new clients get SERVER_BUSY and close 1013."""
    client = await app_client(max_connections=2)
    connect = connector(client)
    await connect("alice")
    await connect("bob")
    third = await connect("carol", join=False)
    await third.expect_error("SERVER_BUSY")
    await third.expect_close(1013)
    assert 'signal_connections_refused_total{limit="server"} 1.0' in await metrics_text(client)


async def test_concurrent_connections_per_ip(app_client):
    """Past --max-connections-per-ip: TOO_MANY_CONNECTIONS, close 4430."""
    client = await app_client(max_connections_per_ip=2)
    connect = connector(client)
    await connect("alice", room="r1")
    await connect("bob", room="r2")
    third = await connect("carol", room="r3", join=False)
    await third.expect_error("TOO_MANY_CONNECTIONS")
    await third.expect_close(4430)


async def test_connection_rate_per_ip(app_client):
    """Past --ip-connect-burst at --ip-connect-rate: refused; leaving does not refill the bucket."""
    client = await app_client(ip_connect_rate=0.1, ip_connect_burst=3)
    connect = connector(client)
    for user in ("a", "b", "c"):
        member = await connect(user, room=user)
        await member.ws.close()
    fourth = await connect("d", join=False)
    await fourth.expect_error("TOO_MANY_CONNECTIONS")
    await fourth.expect_close(4430)
    assert 'signal_connections_refused_total{limit="ip_rate"} 1.0' in await metrics_text(client)


async def test_forwarded_for_is_believed_only_from_trusted_proxies(app_client):
    """Behind a trusted proxy each X-Forwarded-For client has its own per-IP budget."""
    client = await app_client(max_connections_per_ip=1, trusted_proxies=("127.0.0.1/32",))
    connect = connector(client)
    await connect("alice", room="r1", headers={"X-Forwarded-For": "198.51.100.1"})
    await connect("bob", room="r2", headers={"X-Forwarded-For": "198.51.100.2"})
    same = await connect("carol", room="r3", join=False, headers={"X-Forwarded-For": "198.51.100.1"})
    await same.expect_error("TOO_MANY_CONNECTIONS")
    untrusted = await app_client(max_connections_per_ip=1)
    connect = connector(untrusted)
    await connect("alice", room="r1", headers={"X-Forwarded-For": "198.51.100.1"})
    spoofed = await connect("bob", room="r2", join=False, headers={"X-Forwarded-For": "198.51.100.9"})
    await spoofed.expect_error("TOO_MANY_CONNECTIONS")


async def test_concurrent_connections_per_user(app_client):
    """Past --max-connections-per-user: TOO_MANY_CONNECTIONS, close 4430."""
    client = await app_client(max_connections_per_user=2)
    connect = connector(client)
    await connect("alice", room="r1")
    await connect("alice", room="r2")
    third = await connect("alice", room="r3", join=False)
    await third.expect_error("TOO_MANY_CONNECTIONS")
    await third.expect_close(4430)
    await connect("bob", room="r3")
    assert 'signal_connections_refused_total{limit="user_concurrent"} 1.0' in await metrics_text(client)


async def test_rooms_per_user_counts_held_slots(app_client):
    """Past --max-rooms-per-user (live or held slots): TOO_MANY_ROOMS, close 4431."""
    client = await app_client(max_rooms_per_user=2, reconnect_grace=30)
    connect = connector(client)
    await connect("alice", room="r1")
    held = await connect("alice", room="r2")
    await held.ws.close(code=4000)  # application code: the slot is held
    third = await connect("alice", room="r3", join=False)
    await third.expect_error("TOO_MANY_ROOMS")
    await third.expect_close(4431)


async def test_stalled_handshakes_are_dropped_while_new_clients_join(start_server):
    """Connections that never finish their HTTP request are closed after --handshake-timeout."""
    server: Server = await start_server(
        "--port", "0", "--handshake-timeout", "0.5", env={"SIGNAL_JWT_SECRET": "s" * 40}
    )
    port = int((await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
    loop = asyncio.get_running_loop()
    stalled = []
    for _ in range(50):  # bounded
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /webrtc/ws/room?token=")  # and never the rest
        stalled.append((reader, writer))
    started = loop.time()
    async with ClientSession() as session:
        token = make_token("alice", secret="s" * 40)
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/room?token={token}")
        assert json.loads((await ws.receive(timeout=TIMEOUT)).data)["type"] == "room_state"
        for reader, _ in stalled:
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # EOF: the server hung up
        assert loop.time() - started < 0.5 + 2.0
        await ws.send_str('{"type": "ping"}')  # the real client is still served
        assert json.loads((await ws.receive(timeout=TIMEOUT)).data)["type"] == "pong"
        await ws.close()
    for _, writer in stalled:
        writer.close()
