"""Real calls in headless Chromium through the demo page and signal-client.js."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from signal_server.context import SIGNALING

from .conftest import make_token
from .realclients import launch_browser, require_loopback_only, start_page_server, start_signal_server

pytestmark = pytest.mark.netns
WAIT_MS = 20_000

CONNECTED_PEERS = """n => {
  const call = window.demo && window.demo.call;
  if (!call) return false;
  return [...call.peers.values()].filter(p => p.pc.connectionState === 'connected').length >= n;
}"""
FRAMES_DECODED = """async () => {
  let total = 0;
  for (const peer of window.demo.call.peers.values()) {
    (await peer.pc.getStats()).forEach(s => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') total += s.framesDecoded || 0;
    });
  }
  return total;
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    require_loopback_only()
    async with launch_browser() as instance:
        yield instance


@pytest.fixture
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    """(signaling server, page server on another origin)."""
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


def signal_origin(signal: Any) -> str:
    return f"http://127.0.0.1:{signal.port}"


async def open_call(browser: Any, signal: Any, page_server: Any, user: str, room: str = "call",
                    token: str | None = None, same_origin: bool = False) -> Any:
    """A page in its own browser context that joins ``room`` as ``user``.

    Same-origin pages get no token: they use the dev-mode token endpoint, as a
    newcomer's tabs do.
    """
    context = await browser.new_context()
    page = await context.new_page()
    page.on("console", lambda message: print(f"[{user}] {message.text}"))
    if same_origin:
        query = f"name={user}"
        base = signal_origin(signal)
    else:
        query = f"token={token or make_token(user, name=user.title())}&server={signal_origin(signal)}"
        base = f"http://localhost:{page_server.port}"
    await page.goto(f"{base}/?room={room}&{query}&autojoin=1")
    return page


async def frames(page: Any) -> int:
    return int(await page.evaluate(FRAMES_DECODED))


async def test_two_pages_connect_and_decode_video(browser, servers):
    """Two pages reach 'connected' and each decodes the other's video (cross-origin page)."""
    signal, page_server = servers
    alice = await open_call(browser, signal, page_server, "alice")
    bob = await open_call(browser, signal, page_server, "bob")
    for page in (alice, bob):
        await page.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
        await page.wait_for_function(f"async () => ({FRAMES_DECODED})().then(n => n > 0)", timeout=WAIT_MS)
    assert await alice.locator(".tile").count() == 2


async def test_controls_mute_camera_leave_and_peer_status(browser, servers):
    """Mute and camera toggle the local tracks, each tile shows its peer's state, Leave leaves."""
    signal, page_server = servers
    alice = await open_call(browser, signal, page_server, "alice", same_origin=True)
    bob = await open_call(browser, signal, page_server, "bob", same_origin=True)
    await alice.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    await alice.locator('.tile[data-user="bob"] .state').get_by_text("connected").wait_for(timeout=WAIT_MS)
    tracks = "kind => window.demo.call.localStream.getTracks().filter(t => t.kind === kind)[0].enabled"
    await alice.locator("#mute").click()
    assert await alice.evaluate(tracks, "audio") is False
    assert await alice.locator("#mute").inner_text() == "Unmute"
    await alice.locator("#mute").click()
    assert await alice.evaluate(tracks, "audio") is True
    await alice.locator("#camera").click()
    assert await alice.evaluate(tracks, "video") is False
    assert await alice.locator("#camera").inner_text() == "Camera on"
    await alice.locator("#leave").click()
    await bob.locator('.tile[data-user="alice"]').wait_for(state="detached", timeout=WAIT_MS)
    assert await alice.evaluate("window.demo.call.status") == "closed"
    assert await alice.locator(".tile").count() == 0


async def test_simultaneous_renegotiation_glare_settles(browser, servers):
    """Both sides restart ICE at once (offer glare): perfect negotiation settles on fresh ICE, connected."""
    signal, page_server = servers
    alice = await open_call(browser, signal, page_server, "alice", same_origin=True)
    bob = await open_call(browser, signal, page_server, "bob", same_origin=True)
    pages = {"alice": alice, "bob": bob}
    for page in pages.values():
        await page.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    ufrag = "other => window.demo.call.peers.get(other).pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1]"
    before = {user: await page.evaluate(ufrag, "bob" if user == "alice" else "alice") for user, page in pages.items()}
    await asyncio.gather(
        alice.evaluate("window.demo.call.peers.get('bob').pc.restartIce()"),
        bob.evaluate("window.demo.call.peers.get('alice').pc.restartIce()"),
    )
    for user, page in pages.items():
        other = "bob" if user == "alice" else "alice"
        await page.wait_for_function(
            """([other, old]) => {
              const pc = window.demo.call.peers.get(other).pc;
              const now = pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1];
              return now !== old && pc.signalingState === 'stable' && pc.connectionState === 'connected';
            }""",
            arg=[other, before[user]],
            timeout=WAIT_MS,
        )
    assert not [m for page in pages.values() for m in await page.evaluate("window.demo.messages")]


async def test_candidates_before_the_offer_are_queued_not_lost(browser, servers):
    """An ICE candidate from a peer whose offer has not arrived yet waits for the remote description."""
    signal, page_server = servers
    page = await open_call(browser, signal, page_server, "alice", same_origin=True)
    await page.wait_for_function("document.body.dataset.status === 'joined'", timeout=WAIT_MS)
    pending = await page.evaluate(
        """async () => {
          const call = window.demo.call;
          call._handle({type: 'ice_candidate', payload: {
            candidate: 'candidate:1 1 udp 2122260223 127.0.0.1 9 typ host', sdp_mid: '0', sdp_m_line_index: 0,
            sender_id: 'early-bird'}});
          await call.peers.get('early-bird').chain;
          return call.peers.get('early-bird').pendingCandidates.length;
        }"""
    )
    assert pending == 1
    assert await page.evaluate("window.demo.messages") == []  # no error: nothing was thrown away


async def test_three_pages_form_a_full_mesh(browser, servers):
    """Each of three pages holds a connected peer connection to both others (same origin)."""
    signal, page_server = servers
    pages = [await open_call(browser, signal, page_server, user, same_origin=True) for user in ("ann", "ben", "cat")]
    for page in pages:
        await page.wait_for_function(CONNECTED_PEERS, arg=2, timeout=WAIT_MS)
        assert sorted(await page.evaluate("[...window.demo.call.peers.keys()]")) == sorted(
            {"ann", "ben", "cat"} - {await page.evaluate("window.demo.call.selfId")}
        )


async def test_a_cut_websocket_reconnects_resumes_and_the_call_recovers(browser, servers):
    """The server drops a page's socket: it reconnects, resumes its slot, and video keeps flowing."""
    signal, page_server = servers
    alice = await open_call(browser, signal, page_server, "alice")
    bob = await open_call(browser, signal, page_server, "bob")
    for page in (alice, bob):
        await page.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    hub = signal.app[SIGNALING].hub
    bob_slot = hub.rooms["call"].slots["bob"]
    await bob.evaluate("""() => {
      window.statuses = [];
      const shown = window.demo.call.onStatus;  // keep the page's own handler
      window.demo.call.onStatus = (status, detail) => { window.statuses.push(status); shown(status, detail); };
    }""")
    bob_slot.peer._transport.abort()  # no close frame: a network cut
    await bob.wait_for_function("window.statuses.includes('reconnecting')", timeout=WAIT_MS)
    await bob.wait_for_function("window.statuses.at(-1) === 'joined'", timeout=WAIT_MS)
    assert hub.rooms["call"].slots["bob"] is bob_slot  # the same slot, resumed
    assert hub.metrics.resumes >= 1
    before = await frames(alice)
    await alice.wait_for_function(
        f"async () => ({FRAMES_DECODED})().then(n => n > {before} + 10)", timeout=WAIT_MS
    )
    await bob.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    assert any("Connection lost" in m for m in await bob.evaluate("window.demo.messages"))
    assert await bob.locator("#banner").is_hidden()  # cleared once rejoined


@pytest.mark.signal_settings(max_participants=3)
async def test_a_fourth_page_in_a_room_of_three_sees_room_full(browser, servers):
    """The demo shows a clear ROOM_FULL message."""
    signal, page_server = servers
    for user in ("ann", "ben", "cat"):
        page = await open_call(browser, signal, page_server, user)
        await page.wait_for_function("document.body.dataset.status === 'joined'", timeout=WAIT_MS)
    fourth = await open_call(browser, signal, page_server, "dan")
    banner = fourth.locator("#banner")
    await banner.get_by_text("ROOM_FULL").wait_for(timeout=WAIT_MS)
    assert "room is full" in (await banner.inner_text()).lower()


async def test_the_config_response_works_as_rtcpeerconnection_configuration(browser, servers):
    """The guide's quirk, in a real browser: the response passed straight to RTCPeerConnection."""
    signal, page_server = servers
    page = await open_call(browser, signal, page_server, "cfg", same_origin=True)
    await page.wait_for_function("document.body.dataset.status === 'joined'", timeout=WAIT_MS)
    configuration = await page.evaluate(
        """async token => {
          const response = await fetch('/webrtc/config', {headers: {Authorization: `Bearer ${token}`}});
          return new RTCPeerConnection(await response.json()).getConfiguration();
        }""",
        make_token("cfg"),
    )
    assert [server["urls"] for server in configuration["iceServers"]] == [["stun:127.0.0.1:3478"]]
    assert configuration["bundlePolicy"] == "balanced" and configuration["rtcpMuxPolicy"] == "require"


async def test_an_expired_token_shows_unauthorized(browser, servers):
    """The demo shows a clear UNAUTHORIZED message for an expired token."""
    signal, page_server = servers
    page = await open_call(browser, signal, page_server, "eve", token=make_token("eve", ttl=-120))
    await page.locator("#banner").get_by_text("UNAUTHORIZED").wait_for(timeout=WAIT_MS)
