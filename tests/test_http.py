"""HTTP endpoints: ICE config, CORS, health, metrics, access-log redaction, embedding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time

import aiohttp_cors
import pytest
from aiohttp import web

from signal_server import create_app
from signal_server.context import SIGNALING
from signal_server.demo import DEMO_POLICY

from .conftest import Member, connector, make_settings, make_token

AUTH = {"Authorization": f"Bearer {make_token('alice')}"}


async def test_config_has_snake_and_camel_case_keys(app_client):
    """The guide's snake_case keys and the camelCase ones RTCPeerConnection reads, same values."""
    client = await app_client(
        stun_urls=("stun:stun.example:3478",), turn_urls=("turn:turn.example:3478",),
        turn_username="u", turn_credential="p",
    )
    response = await client.get("/webrtc/config", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    servers = [{"urls": ["stun:stun.example:3478"]},
               {"urls": ["turn:turn.example:3478"], "username": "u", "credential": "p"}]
    assert body["ice_servers"] == body["iceServers"] == servers
    assert body["ice_transport_policy"] == body["iceTransportPolicy"] == "all"
    assert body["bundle_policy"] == body["bundlePolicy"] == "balanced"
    assert body["rtcp_mux_policy"] == body["rtcpMuxPolicy"] == "require"
    assert "ttl" not in body


async def test_turn_rest_credentials_match_an_hmac_computed_here(app_client):
    """username '<expiry>:<sub>', credential base64(HMAC-SHA1(secret, username)), ttl reported."""
    client = await app_client(turn_urls=("turn:turn.example:3478", "turns:turn.example:5349"),
                              turn_secret="coturn-secret", turn_ttl=600)
    before = int(time.time())
    body = await (await client.get("/webrtc/config", headers=AUTH)).json()
    after = int(time.time())
    assert body["ttl"] == 600
    (turn,) = body["ice_servers"]
    assert turn["urls"] == ["turn:turn.example:3478", "turns:turn.example:5349"]
    assert turn["ttl"] == 600
    expiry, user = turn["username"].split(":")
    assert user == "alice" and before + 600 <= int(expiry) <= after + 600
    expected = base64.b64encode(
        hmac.new(b"coturn-secret", turn["username"].encode(), hashlib.sha1).digest()
    ).decode()
    assert turn["credential"] == expected


@pytest.mark.parametrize(
    ("headers", "error_code"),
    [({}, False), ({"Authorization": "Bearer nope"}, True), ({"Authorization": "Basic abc"}, False)],
)
async def test_config_without_a_valid_token_is_401(client, headers, error_code):
    """401 JSON {error, message} with a WWW-Authenticate: Bearer header; its error code
    only when a bearer token was presented (RFC 6750 3.1)."""
    response = await client.get("/webrtc/config", headers=headers)
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="signal-server"')
    assert ('error="invalid_token"' in challenge) is error_code, challenge
    body = await response.json()
    assert body["error"] == "UNAUTHORIZED" and body["message"].startswith("UNAUTHORIZED")


async def test_cors_preflight_allowed_and_refused(app_client):
    """Preflight from an allowed origin succeeds with CORS headers; another origin is refused."""
    client = await app_client(allowed_origins=("https://app.example",))
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    ok = await client.options("/webrtc/config", headers={"Origin": "https://app.example", **preflight})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "AUTHORIZATION" in ok.headers["Access-Control-Allow-Headers"].upper()
    refused = await client.options("/webrtc/config", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    real = await client.get("/webrtc/config", headers={"Origin": "https://app.example", **AUTH})
    assert real.headers["Access-Control-Allow-Origin"] == "https://app.example"
    evil = await client.get("/webrtc/config", headers={"Origin": "https://evil.example", **AUTH})
    assert "Access-Control-Allow-Origin" not in evil.headers


async def test_a_websocket_upgrade_runs_no_cors_hook(app_client, monkeypatch):
    """aiohttp-cors looks at every response; the upgrade route has no CORS, so a join skips it
    (and plain HTTP still gets its CORS headers and its one-response close)."""
    seen: list[str] = []
    real = aiohttp_cors.cors_config._CorsConfigImpl._on_response_prepare

    async def counting(self, request, response):
        seen.append(request.path)
        await real(self, request, response)

    monkeypatch.setattr(aiohttp_cors.cors_config._CorsConfigImpl, "_on_response_prepare", counting)
    client = await app_client(allowed_origins=("https://app.example",))
    member = await connector(client)("alice", headers={"Origin": "https://app.example"})
    await member.ws.close()
    real_get = await client.get("/webrtc/config", headers={"Origin": "https://app.example", **AUTH})
    assert real_get.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert real_get.headers["Connection"] == "close"
    assert seen == ["/webrtc/config"]


async def test_cors_allows_any_origin_when_unconfigured(client):
    """An empty allow-list allows every origin (the dev default)."""
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization",
                 "Origin": "http://localhost:5173"}
    response = await client.options("/webrtc/config", headers=preflight)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "http://localhost:5173")


async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_readiness_turns_503_when_shutting_down(client):
    """Once shutdown starts, /readyz answers 503 so a load balancer stops sending clients."""
    await client.app.on_shutdown.send(client.app)
    response = await client.get("/readyz")
    assert response.status == 503 and (await response.json())["status"] == "not ready"


async def test_metrics_count_what_happened(client):
    """Connections, rooms, joins, relayed-by-type, errors-by-code, leaves-by-reason."""
    connect = connector(client)
    alice = await connect("alice")
    bob = await connect("bob")
    await alice.expect("user_joined")
    await bob.offer()
    await alice.expect("offer")
    await alice.ws.send_str("junk")
    await alice.expect_error("INVALID_MESSAGE")
    text = await (await client.get("/metrics")).text()
    assert "signal_connections 2.0" in text
    assert "signal_rooms 1.0" in text
    assert "signal_joins_total 2.0" in text
    assert 'signal_messages_relayed_total{type="offer"} 1.0' in text
    assert 'signal_errors_total{code="INVALID_MESSAGE"} 1.0' in text
    await bob.ws.close()
    await alice.expect("user_left")
    text = await (await client.get("/metrics")).text()
    assert 'signal_leaves_total{reason="left"} 1.0' in text
    assert "signal_connections 1.0" in text


async def test_token_cache_metrics(client):
    """Hits, misses, entries and bytes of the verified-token cache, as a reconnect sees them."""
    token = make_token("alice")
    url = f"/webrtc/ws/room-1?token={token}"
    for _ in range(2):  # the first join verifies the token, the second finds it cached
        ws = await client.ws_connect(url)
        assert json.loads((await ws.receive()).data)["type"] == "room_state"
        await ws.close()
    text = await (await client.get("/metrics")).text()
    assert "signal_token_cache_hits_total 1.0" in text
    assert "signal_token_cache_misses_total 1.0" in text
    assert "signal_token_cache_entries 1.0" in text
    size = re.search(r"^signal_token_cache_bytes (\S+)$", text, re.M)
    assert size and float(size.group(1)) > 0


async def test_access_log_never_contains_the_token(client, caplog):
    """The token query value is redacted in the access log line (and in request errors)."""
    token = make_token("alice")
    caplog.set_level(logging.INFO)
    ws = await client.ws_connect(f"/webrtc/ws/room-1?token={token}")
    await Member(ws, "alice").expect("room_state")
    await ws.close()
    await client.get(f"/webrtc/ws/room-1?x=1&token={'t' * 9000}")  # over-long line: logged as an error
    await client.close()  # flushes access logs of finished requests
    records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert any("token=[redacted]" in r.getMessage() for r in records if r.name == "aiohttp.access")
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        assert token not in text and "tttttttt" not in text, text


async def test_embedding_in_a_host_app(aiohttp_client):
    """Mounted as a sub-app, signaling and the host's own routes and middlewares both work."""
    events: list[str] = []

    @web.middleware
    async def tag(request: web.Request, handler):
        response = await handler(request)
        response.headers["X-Host"] = "yes"
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="host says hi")

    async def host_lifecycle(app: web.Application):
        events.append("host-start")
        yield
        events.append("host-stop")

    host = web.Application(middlewares=[tag])
    host.router.add_get("/hello", hello)
    host.cleanup_ctx.append(host_lifecycle)
    signaling = create_app(make_settings())
    host.add_subapp("/api/rtc", signaling)
    client = await aiohttp_client(host)
    assert await (await client.get("/hello")).text() == "host says hi"
    config = await client.get("/api/rtc/config", headers=AUTH)
    assert config.status == 200 and config.headers["X-Host"] == "yes"
    assert (await client.get("/api/rtc/readyz")).status == 200
    ws = await client.ws_connect(f"/api/rtc/ws/room-1?token={make_token('alice')}")
    member = Member(ws, "alice")
    assert (await member.expect("room_state"))["room_id"] == "room-1"
    await member.send("ping")
    await member.expect("pong")
    assert events == ["host-start"]
    await client.close()
    assert events == ["host-start", "host-stop"]
    assert signaling[SIGNALING].ready is False  # the sub-app's cleanup ran with the host's


async def test_demo_page_and_client_module_are_served(app_client):
    """/ serves the demo page; /webrtc/signal-client.js the module, CORS-enabled for allowed origins."""
    client = await app_client(allowed_origins=("http://localhost:5173",))
    page = await client.get("/")
    assert page.status == 200 and "signal-server demo" in await page.text()
    script = await client.get("/demo.js")
    assert script.status == 200 and "javascript" in script.headers["Content-Type"]
    module = await client.get("/webrtc/signal-client.js", headers={"Origin": "http://localhost:5173"})
    assert module.status == 200 and "javascript" in module.headers["Content-Type"]
    assert "export class WebRTCCall" in await module.text()
    assert module.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


async def test_the_demo_page_is_served_with_a_strict_policy(app_client):
    """The page, its script and its styles: a strict CSP, no framing, no sniffing, no referrer."""
    client = await app_client()
    for path in ("/", "/demo.js", "/demo.css"):
        response = await client.get(path)
        assert response.status == 200, path
        policy = response.headers["Content-Security-Policy"]
        assert policy == DEMO_POLICY
        for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"):
            assert directive in policy
        assert "unsafe" not in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "<style" not in await (await client.get("/")).text()  # style-src 'self': no inline styles
    module = await client.get("/webrtc/signal-client.js")
    assert module.headers["X-Content-Type-Options"] == "nosniff"


async def test_dev_tokens_exist_only_in_dev_mode(app_client):
    """/dev/token mints working tokens in dev mode and does not exist otherwise."""
    production = await app_client()
    assert (await production.get("/dev/token?user=alice")).status == 404
    dev = await app_client(dev_mode=True)
    assert (await dev.get("/dev/token?user=bad user")).status == 400
    token = (await (await dev.get("/dev/token?user=alice&name=Alice")).json())["token"]
    ws = await dev.ws_connect(f"/webrtc/ws/room-1?token={token}")
    state = await Member(ws, "alice").expect("room_state")
    assert state["payload"]["self"] == {"user_id": "alice", "username": "Alice"}
