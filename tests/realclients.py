"""Helpers for tests with real WebRTC stacks: the namespace guard, Chromium, servers.

Chromium and aiortc gather ICE candidates on every interface, so these tests
must run where loopback is the only one: `make test` starts them inside
`unshare -n` after `ip link set lo up`. Anywhere else they fail (never fall
back to the real interfaces).
"""

from __future__ import annotations

import json
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


HARNESS = """<!doctype html>
<meta charset="utf-8"><link rel="icon" href="data:,"><title>harness</title>
<script type="module">
import * as M from "./signal-client.js";
// What the tests read: every event of the call, the sockets it opened, its config fetches.
window.M = M;
window.sockets = [];
window.configs = [];
const NativeSocket = window.WebSocket;
window.WebSocket = class extends NativeSocket {
  constructor(...args) { super(...args); window.sockets.push(this); }
};
const nativeFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await nativeFetch(...args);
  if (String(args[0]).endsWith("/config")) response.clone().json().then((body) => window.configs.push(body));
  return response;
};
window.gate = null;  // a promise the token function waits on, while set
window.hold = () => {
  window.gate = new Promise((resolve) => { window.release = () => { window.gate = null; resolve(); }; });
};
window.setup = (server, token, room, options) => {
  window.events = [];
  window.tokenWaiting = false;
  const call = new M.WebRTCCall(server, async () => {
    if (window.gate) { window.tokenWaiting = true; await window.gate; window.tokenWaiting = false; }
    return token;
  }, room, options);
  const plain = (value) => value instanceof MediaStream ? value.id
    : value instanceof Error ? {code: value.code, message: value.message}
    : value && typeof value === "object" ? JSON.parse(JSON.stringify(value)) : value;
  for (const type of ["status", "error", "roomstate", "participantjoined", "participantleft",
                      "remotestream", "remotestreamremoved", "connectionstatechange", "servermessage"]) {
    call.on(type, (...args) => window.events.push({type, args: args.map(plain)}));
  }
  window.call = call;
  return true;
};
window.ready = true;
</script>
"""


async def start_page_server() -> TestServer:
    """A page on another origin (localhost vs 127.0.0.1, another port) that loads the module: CORS is exercised.

    ``/`` is a test harness around signal-client.js (``window.setup``, ``window.events``).
    """
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=HARNESS, content_type="text/html")

    async def module(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "signal-client.js")

    app.router.add_get("/", index)
    app.router.add_get("/signal-client.js", module)
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


WAIT_MS = 20_000


async def wait_for(page: Any, expression: str, arg: Any = None, timeout: float = WAIT_MS) -> Any:
    """``page.wait_for_function`` for pages under a strict CSP: the same polling, run by ``page.evaluate``.

    ``expression`` is an expression, or a function of ``arg`` (may be async). Playwright's
    wait_for_function compiles its predicate with eval(), which the demo page's policy forbids
    (no 'unsafe-eval'); page.evaluate goes through the DevTools protocol, which the policy does not cover.
    It must poll, as wait_for_function does: what it reads (RTCPeerConnection stats, decoded
    frame counts, page variables) fires no event; it asks every 50 ms and fails after ``timeout``.
    """
    return await page.evaluate(
        f"""async ([arg, timeout]) => {{
          const get = () => ({expression});
          const end = performance.now() + timeout;
          for (;;) {{
            let value = get();
            if (typeof value === 'function') value = value(arg);
            value = await value;
            if (value) return value;
            if (performance.now() > end) throw new Error('timed out waiting for ' + {json.dumps(expression[:300])});
            await new Promise(resolve => setTimeout(resolve, 50));
          }}
        }}""",
        [arg, timeout],
    )


async def open_and_join(page: Any, url: str) -> None:
    """Open the demo page at ``url`` and press Join (the page never joins by itself)."""
    await page.goto(url)
    await wait_for(page, "window.demo?.ready === true")
    await page.locator("#join").click()
CALL = "(window.demo ? window.demo.call : window.call)"
CONNECTED_PEERS = f"""n => {{
  const call = {CALL};
  if (!call) return false;
  return [...call.participants.keys()]
    .filter(id => call.getPeerConnection(id)?.connectionState === 'connected').length >= n;
}}"""
# Video frames decoded from every peer, or from one user id.
FRAMES_DECODED = f"""async (from) => {{
  const call = {CALL};
  let total = 0;
  for (const id of call.participants.keys()) {{
    const pc = call.getPeerConnection(id);
    if (!pc || (from && id !== from)) continue;
    (await pc.getStats()).forEach(s => {{
      if (s.type === 'inbound-rtp' && s.kind === 'video') total += s.framesDecoded || 0;
    }});
  }}
  return total;
}}"""


def frames_above(count: int, sender: str | None = None) -> str:
    """A wait_for_function body: more than ``count`` frames decoded (from ``sender``)."""
    return f"async () => ({FRAMES_DECODED})({json.dumps(sender)}).then(n => n > {count})"


async def frames(page: Any, sender: str | None = None) -> int:
    return int(await page.evaluate(FRAMES_DECODED, sender))


async def module_call(
    browser: Any, page_server: TestServer, server_url: str, user: str, *, room: str = "call",
    token: str | None = None, options: dict[str, Any] | None = None, media: bool = True, connect: bool = True,
) -> Any:
    """A harness page (another origin) with ``window.call``: signal-client.js joining ``room`` as ``user``."""
    from .conftest import make_token

    context = await browser.new_context()
    page = await context.new_page()
    page.on("console", lambda message: print(f"[{user}] {message.text}"))
    await page.goto(f"http://localhost:{page_server.port}/")
    await page.wait_for_function("window.ready === true", timeout=WAIT_MS)
    await page.evaluate(
        "([server, token, room, options]) => window.setup(server, token, room, options)",
        [server_url, token or make_token(user, name=user.title()), room, options or {}],
    )
    if media:
        await page.evaluate("window.call.initLocalStream({video: {width: 320, height: 240}, audio: true})")
    if connect:
        await page.evaluate("window.call.connect().then(() => true)")
    return page
