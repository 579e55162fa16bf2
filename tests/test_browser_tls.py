"""The demo page and signal-client.js over https:// and wss://, served by the command itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .certs import Authority
from .realclients import (
    CONNECTED_PEERS,
    FRAMES_DECODED,
    WAIT_MS,
    launch_browser,
    open_and_join,
    require_loopback_only,
    wait_for,
)

pytestmark = pytest.mark.netns


async def test_a_call_over_https_and_wss(start_server, tmp_path: Path) -> None:
    """Chromium trusts the test certificate (by its key, nothing else) and two pages make a call.

    Camera and microphone need a secure page, and a secure page may only
    open wss://: this is the set-up a browser-facing server must support.
    """
    require_loopback_only()
    leaf = Authority().issue()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    leaf.install(cert, key)
    server = await start_server("--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
                                "--stun-url", "stun:127.0.0.1:3478")
    base = (await server.line_matching(r"listening on (https://127\.0\.0\.1:\d+)")).group(1)
    await server.line_matching("DEV MODE")
    async with launch_browser(f"--ignore-certificate-errors-spki-list={leaf.spki_sha256()}") as browser:
        pages: list[Any] = []
        sockets: dict[Any, list[str]] = {}
        for user in ("alice", "bob"):
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda message, user=user: print(f"[{user}] {message.text}"))
            sockets[page] = []
            page.on("websocket", lambda websocket, seen=sockets[page]: seen.append(websocket.url))
            await open_and_join(page, f"{base}/?room=secure&name={user}")
            pages.append(page)
        for page in pages:
            await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
            await wait_for(page, f"async () => ({FRAMES_DECODED})().then(n => n > 0)", timeout=WAIT_MS)
            assert await page.evaluate("window.isSecureContext") is True
            (websocket_url,) = sockets[page]  # the call's socket (its internals are private)
            assert websocket_url.startswith(base.replace("https://", "wss://") + "/webrtc/ws/secure?token=")
