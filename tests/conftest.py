"""Shared fixtures: the real app on a real loopback socket, and a client helper."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from signal_server import Settings, create_standalone_app, hub as hub_module
from signal_server.protocol import encode_server_message

SECRET = "test-secret-that-is-long-enough-for-hs256"
# One scale for every wait in the suite; raise it on a slow machine.
TIMEOUT = float(os.environ.get("SIGNAL_TEST_TIMEOUT", "5"))
# The installed console script, next to the interpreter running the tests.
COMMAND = [str(Path(sys.executable).with_name("signal-server"))]
WSCAT_DIR = Path(__file__).parent.parent / ".venv" / "wscat"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_secret": SECRET, "heartbeat": 30.0}
    values.update(overrides)
    return Settings(**values)


def make_token(sub: str = "alice", *, secret: str = SECRET, ttl: int = 600, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    body.update(claims)
    return jwt.encode(body, secret, algorithm="HS256")


class Member:
    """One signaling connection seen from the client side."""

    def __init__(self, ws: ClientWebSocketResponse, user: str) -> None:
        self.ws = ws
        self.user = user

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        assert message.type is WSMsgType.TEXT, f"{self.user} expected text, got {message.type} {message.data!r}"
        value: dict[str, Any] = json.loads(message.data)
        return value

    async def expect(self, kind: str) -> dict[str, Any]:
        message = await self.recv()
        assert message["type"] == kind, f"{self.user} expected {kind}, got {message}"
        return message

    async def expect_error(self, code: str) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["payload"]["code"] == code, message
        assert message["payload"]["message"].startswith(code), message
        return message

    async def expect_close(self, code: int) -> None:
        message = await asyncio.wait_for(self.ws.receive(), TIMEOUT)
        while message.type is WSMsgType.TEXT:  # drain what was queued before the close
            message = await asyncio.wait_for(self.ws.receive(), TIMEOUT)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), message
        # The close frame's code is what the server sent; ws.close_code can
        # read 1006 when the server drops TCP before our close reply is out.
        received = message.data if message.type is WSMsgType.CLOSE else self.ws.close_code
        assert received == code, (received, message)

    async def send(self, kind: str, **payload: Any) -> None:
        await self.ws.send_str(json.dumps({"type": kind, "payload": payload}))

    async def offer(self, sdp: str = "v=0", **extra: Any) -> None:
        await self.send("offer", type="offer", sdp=sdp, **extra)


Connect = Callable[..., Awaitable[Member]]


@pytest.fixture
async def app_client(aiohttp_client: AiohttpClient) -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    """Factory: a running standalone app with the given settings overrides."""

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_standalone_app(make_settings(**overrides)))

    yield start


@pytest.fixture
async def client(app_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> TestClient[Any, Any]:
    return await app_client()


def connector(client: TestClient[Any, Any]) -> Connect:
    async def connect(
        user: str = "alice", room: str = "room-1", *, token: str | None = None, join: bool = True,
        headers: dict[str, str] | None = None, **claims: Any,
    ) -> Member:
        token = token if token is not None else make_token(user, **claims)
        ws = await client.ws_connect(f"/webrtc/ws/{room}?token={token}", headers=headers)
        member = Member(ws, user)
        if join:
            await member.expect("room_state")
        return member

    return connect


async def join_all(connect: Connect, *users: str) -> list[Member]:
    """Join ``users`` in order and consume every user_joined, so all start with an empty queue."""
    members: list[Member] = []
    for user in users:
        member = await connect(user)
        for earlier in members:
            await earlier.expect("user_joined")
        members.append(member)
    return members


@pytest.fixture
def connect(client: TestClient[Any, Any]) -> Connect:
    """Connect to ``client`` and (by default) wait for room_state."""
    return connector(client)


class Server:
    """The real command in a subprocess, with its output collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def line_matching(self, pattern: str) -> re.Match[str]:
        assert self.process.stdout is not None
        async with asyncio.timeout(TIMEOUT * 3):
            while True:
                raw = await self.process.stdout.readline()
                assert raw, f"server exited before printing {pattern!r}: {self.lines}"
                line = raw.decode()
                self.lines.append(line)
                match = re.search(pattern, line)
                if match:
                    return match


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    started: list[Server] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Server:
        process = await asyncio.create_subprocess_exec(
            *COMMAND, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**without_secret(os.environ), **(env or {})},
        )
        server = Server(process)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.returncode is None:
            server.process.kill()
            await server.process.wait()


# ------------------------------------------------- real browsers (netns tests)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium; fails outside a loopback-only namespace."""
    from .realclients import launch_browser, require_loopback_only

    require_loopback_only()
    async with launch_browser() as instance:
        yield instance


@pytest.fixture
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """(signaling server in dev mode, page server on another origin).

    Settings come from a ``signal_settings(**overrides)`` marker.
    """
    from .realclients import start_page_server, start_signal_server

    marker = request.node.get_closest_marker("signal_settings")
    overrides = dict(marker.kwargs) if marker else {}
    page_server = await start_page_server()
    page_origin = f"http://localhost:{page_server.port}"
    overrides.setdefault("stun_urls", ("stun:127.0.0.1:3478",))  # loopback: nothing leaves the namespace
    signal = await start_signal_server(allowed_origins=(page_origin,), dev_mode=True, **overrides)
    try:
        yield signal, page_server
    finally:
        await signal.close()
        await page_server.close()


@pytest.fixture
async def shells() -> AsyncIterator[Any]:
    """Shells running documentation blocks (tests/docblocks.py); every one killed at the end."""
    from .docblocks import open_shells

    async for open_terminal in open_shells():
        yield open_terminal


@pytest.fixture(scope="session")
def wscat() -> Path:
    """Install wscat locally (once) so `npx --yes wscat` runs it without a download."""
    binary = WSCAT_DIR / "node_modules" / ".bin" / "wscat"
    if not binary.exists():
        WSCAT_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(WSCAT_DIR), "wscat@6"],
            check=True, timeout=300,
        )
    assert binary.exists()
    return WSCAT_DIR


def fail_room_state_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next ``room_state`` the hub encodes raises (an encoder bug); later ones encode."""
    failures = iter([True])

    def failing_once(kind: str, payload: dict[str, Any], room_id: str | None) -> bytes:
        if kind == "room_state" and next(failures, False):
            raise TypeError("an encoder bug")
        return encode_server_message(kind, payload, room_id)

    monkeypatch.setattr(hub_module, "encode_server_message", failing_once)


def without_secret(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without a JWT secret the developer's shell may carry (empty would be refused)."""
    return {name: value for name, value in environ.items() if name != "SIGNAL_JWT_SECRET"}

