"""Refusals an operator must be able to explain from the log: a page origin the allow-list
refuses, X-Forwarded-For from a peer that is no trusted proxy, a per-IP limit that counts a
proxy, a token signed with another key. Each line names the option to set, and a client
choosing the keys cannot make the log (or the table behind it) grow without bound."""

from __future__ import annotations

import logging

import pytest

from signal_server.hints import OncePerKey

from .conftest import connector, make_token

HINTS = "signal_server.hints"
PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}


def hint_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == HINTS]


async def test_a_refused_origin_is_logged_once_naming_the_option(app_client, caplog):
    """Preflight, config GET and WebSocket from an unlisted origin: one warning naming it and
    --allowed-origin; a listed origin, or a repeat, adds none."""
    caplog.set_level(logging.INFO, logger=HINTS)
    client = await app_client(allowed_origins=("https://app.example",))
    ok = await client.options("/webrtc/config", headers={"Origin": "https://app.example", **PREFLIGHT})
    assert ok.status == 200 and hint_lines(caplog) == []
    refused = await client.options("/webrtc/config", headers={"Origin": "https://other.example", **PREFLIGHT})
    assert refused.status == 403
    [line] = hint_lines(caplog)
    assert "'https://other.example'" in line and "--allowed-origin" in line and "CORS OPTIONS" in line
    await client.get("/webrtc/config", headers={"Origin": "https://other.example"})
    member = await connector(client)("alice", join=False, headers={"Origin": "https://other.example"})
    await member.expect_error("FORBIDDEN")
    assert len(hint_lines(caplog)) == 1  # the same origin again: nothing more
    member = await connector(client)("bob", join=False, headers={"Origin": "https://third.example"})
    await member.expect_error("FORBIDDEN")
    assert "'https://third.example' refused (WebSocket)" in hint_lines(caplog)[1]


async def test_made_up_origins_cost_a_few_lines_and_bounded_memory(app_client, caplog):
    """Hundreds of distinct hostile origins: a burst of lines, then silence; the table stays bounded."""
    caplog.set_level(logging.INFO, logger=HINTS)
    client = await app_client(allowed_origins=("https://app.example",))
    for n in range(300):
        origin = f"https://x{n}.example/" + "a" * 5000 if n % 2 else f"https://x{n}.example"
        await client.options("/webrtc/config", headers={"Origin": origin, **PREFLIGHT})
    lines = hint_lines(caplog)
    assert 1 <= len(lines) <= 20
    assert max(len(line) for line in lines) < 500  # a long Origin is cut


def test_once_per_key_is_bounded_and_repeats_after_its_interval():
    """The key table never passes max_keys; a key is due again once its interval has passed."""
    gate = OncePerKey(0.0, interval=10.0, max_keys=8, burst=1000, rate=1000.0)
    assert gate.due("a", 0.0) and not gate.due("a", 5.0) and gate.due("a", 10.0)
    for n in range(100):
        assert gate.due(f"k{n}", 20.0 + n * 0.001)
        assert len(gate._last) <= 8


async def test_forwarded_for_from_an_untrusted_peer_is_logged_once(app_client, caplog):
    """Behind a proxy without --trusted-proxy: one warning per peer address naming --trusted-proxy;
    none without the header, none from a trusted proxy."""
    caplog.set_level(logging.INFO, logger=HINTS)
    trusted = connector(await app_client(trusted_proxies=("127.0.0.1/32",)))
    await trusted("alice", headers={"X-Forwarded-For": "198.51.100.1"})
    connect = connector(await app_client())
    await connect("alice", room="r1")
    assert hint_lines(caplog) == []
    await connect("bob", room="r2", headers={"X-Forwarded-For": "198.51.100.2"})
    await connect("carol", room="r3", headers={"Forwarded": "for=198.51.100.3"})
    [line] = hint_lines(caplog)
    assert "from '127.0.0.1' ignored" in line and "add --trusted-proxy 127.0.0.1" in line


async def test_a_per_ip_refusal_of_a_loopback_address_points_at_trusted_proxy(app_client, caplog):
    """The per-IP limit counts a loopback address with no proxy trusted: the message and the
    log line say --trusted-proxy; with a proxy trusted, the message is the plain one."""
    caplog.set_level(logging.INFO, logger=HINTS)
    connect = connector(await app_client(max_connections_per_ip=1))
    await connect("alice", room="r1")
    third = await connect("bob", room="r2", join=False)
    error = await third.expect_error("TOO_MANY_CONNECTIONS")
    assert "--trusted-proxy" in error["payload"]["message"]
    assert any("refused a connection from 127.0.0.1" in line and "--trusted-proxy" in line
               for line in hint_lines(caplog))
    connect = connector(await app_client(max_connections_per_ip=1, trusted_proxies=("10.0.0.1",)))
    await connect("alice", room="r1")
    other = await connect("bob", room="r2", join=False)
    error = await other.expect_error("TOO_MANY_CONNECTIONS")
    assert error["payload"]["message"] == "TOO_MANY_CONNECTIONS: at most 1 connections per address"


async def test_a_token_signed_with_another_key_says_so(app_client):
    """A backend signing with another secret: the message says the signature does not match the
    key given as --jwt-secret, on the WebSocket and on /config alike."""
    client = await app_client()
    token = make_token("alice", secret="another-secret-that-is-long-enough-for-hs256!")
    member = await connector(client)("alice", token=token, join=False)
    error = await member.expect_error("UNAUTHORIZED")
    assert "signature does not match this server's key" in error["payload"]["message"]
    assert "--jwt-secret" in error["payload"]["message"]
    response = await client.get("/webrtc/config", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 401
    assert "--jwt-secret" in (await response.json())["message"]
