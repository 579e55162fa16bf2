"""Helpers for tests with real WebRTC stacks: the namespace guard, Chromium, servers.

Chromium and aiortc gather ICE candidates on every interface, so these tests
must run where loopback is the only one: `make test` starts them inside
`unshare -n` after `ip link set lo up`. Anywhere else they fail (never fall
back to the real interfaces).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from signal_server import create_standalone_app
from signal_server.demo import STATIC

from .conftest import make_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
NETNS_HINT = (
    "WebRTC tests must run in a loopback-only network namespace; use `make test`, or "
    "`unshare -n sh -c 'ip link set lo up && .venv/bin/python -m pytest -m netns'` as root"
)


def require_loopback_only() -> None:
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        pytest.fail(f"{NETNS_HINT} (interfaces here: {', '.join(names)})", pytrace=False)
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 0))  # loopback must be up
    except OSError as exc:
        pytest.fail(f"{NETNS_HINT} (loopback is down: {exc})", pytrace=False)
    finally:
        probe.close()


async def start_signal_server(**overrides: Any) -> TestServer:
    server = TestServer(create_standalone_app(make_settings(**overrides)), host="127.0.0.1")
    await server.start_server()
    return server


async def start_page_server() -> TestServer:
    """The demo page from another origin (localhost vs 127.0.0.1, another port): CORS is exercised."""
    app = web.Application()

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def script(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "demo.js")

    app.router.add_get("/", index)
    app.router.add_get("/demo.js", script)
    server = TestServer(app, host="localhost")
    await server.start_server()
    return server


@asynccontextmanager
async def launch_browser(*extra_args: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            await browser.close()
