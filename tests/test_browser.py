"""The demo page in headless Chromium: real calls, its controls, its messages, its layout."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from signal_server import create_standalone_app
from signal_server.context import SIGNALING

from .conftest import make_settings, make_token
from .realclients import CONNECTED_PEERS, WAIT_MS, frames, frames_above, open_and_join, wait_for

pytestmark = pytest.mark.netns
SCREENSHOTS = Path(__file__).parent.parent / "build" / "screenshots"
# Every camera the page opens, so a test can see which are still running.
TRACK_LOG = """
window.__tracks = [];
window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective));
const capture = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (constraints) => {
  const stream = await capture(constraints);
  window.__tracks.push(...stream.getTracks());
  return stream;
};
"""
LIVE_TRACKS = "window.__tracks.filter(t => t.readyState === 'live').length"


def signal_origin(signal: Any) -> str:
    return f"http://127.0.0.1:{signal.port}"


async def open_demo(
    browser: Any, signal: Any, user: str | None, room: str = "call", *, token: str | None = None,
    query: str = "", viewport: dict[str, int] | None = None, listen: Any = None, join: bool = True,
    init: str = "",
) -> Any:
    """The demo page from the signaling server itself, in its own browser context; Join pressed when ``join``.

    Without a token it uses the dev-mode token endpoint (as ``name=user`` when given).
    """
    context = await browser.new_context(viewport=viewport)
    await context.add_init_script(TRACK_LOG + init)
    page = await context.new_page()
    if listen:
        listen(page)
    page.on("console", lambda message: print(f"[{user}] {message.type}: {message.text}"))
    parts = [f"room={room}"]
    if token:
        parts.append(f"token={token}")
    elif user:
        parts.append(f"name={user}")
    if query:
        parts.append(query)
    url = f"{signal_origin(signal)}/?{'&'.join(parts)}"
    if join:
        await open_and_join(page, url)
    else:
        await page.goto(url)
        await wait_for(page, "document.readyState === 'complete'", timeout=WAIT_MS)
    return page


async def reload_and_join(page: Any) -> None:
    await page.reload()
    await wait_for(page, "window.demo?.ready === true", timeout=WAIT_MS)
    await page.locator("#join").click()


async def joined(page: Any) -> None:
    await wait_for(page, "document.body.dataset.status === 'joined'", timeout=WAIT_MS)


async def test_controls_mute_camera_leave_and_a_fresh_join(browser, servers):
    """Mute and camera switch the local tracks, tiles show peer state, Leave leaves, Join again starts clean."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice")
    bob = await open_demo(browser, signal, "bob")
    await wait_for(alice, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    await alice.locator('.tile[data-user="bob"] .state').get_by_text("connected").wait_for(timeout=WAIT_MS)
    tracks = "kind => window.demo.call.localStream.getTracks().filter(t => t.kind === kind)[0].enabled"
    await alice.locator("#mute").click()
    assert await alice.evaluate(tracks, "audio") is False
    assert await alice.locator("#mute").inner_text() == "Unmute"
    await alice.locator("#mute").click()
    assert await alice.evaluate(tracks, "audio") is True
    await alice.locator("#camera").click()
    await alice.locator("#mute").click()
    assert await alice.evaluate(tracks, "video") is False
    assert await alice.locator("#camera").inner_text() == "Camera on"
    await alice.locator("#leave").click()
    await bob.locator('.tile[data-user="alice"]').wait_for(state="detached", timeout=WAIT_MS)
    assert await alice.locator(".tile").count() == 0
    assert await alice.evaluate(LIVE_TRACKS) == 0  # Leave turns the camera off
    assert await alice.locator("#status").inner_text() == "not connected"
    await alice.locator("#join").click()
    await joined(alice)
    assert await alice.locator("#mute").inner_text() == "Mute"
    assert await alice.locator("#camera").inner_text() == "Camera off"
    assert await alice.locator("footer button.off").count() == 1  # Leave only
    assert await alice.evaluate(tracks, "audio") is True and await alice.evaluate(tracks, "video") is True
    assert await alice.evaluate(LIVE_TRACKS) == 2


async def test_simultaneous_renegotiation_glare_settles(browser, servers):
    """Both sides restart ICE at once (offer glare): perfect negotiation settles on fresh ICE, connected."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice")
    bob = await open_demo(browser, signal, "bob")
    pages = {"alice": alice, "bob": bob}
    for page in pages.values():
        await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    pc = "other => window.demo.call.getPeerConnection(other)"
    ufrag = f"other => ({pc})(other).remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1]"
    before = {user: await page.evaluate(ufrag, "bob" if user == "alice" else "alice") for user, page in pages.items()}
    await asyncio.gather(
        alice.evaluate(f"({pc})('bob').restartIce()"),
        bob.evaluate(f"({pc})('alice').restartIce()"),
    )
    for user, page in pages.items():
        other = "bob" if user == "alice" else "alice"
        await wait_for(
            page, """([other, old]) => {
              const pc = window.demo.call.getPeerConnection(other);
              const now = pc.remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1];
              return now !== old && pc.signalingState === 'stable' && pc.connectionState === 'connected';
            }""",
            arg=[other, before[user]],
            timeout=WAIT_MS,
        )
    assert not [m for page in pages.values() for m in await page.evaluate("window.demo.messages")]


async def test_three_pages_form_a_full_mesh(browser, servers):
    """Each of three pages holds a connected peer connection to both others."""
    signal, _ = servers
    pages = [await open_demo(browser, signal, user) for user in ("ann", "ben", "cat")]
    for page in pages:
        await wait_for(page, CONNECTED_PEERS, arg=2, timeout=WAIT_MS)
        assert sorted(await page.evaluate("[...window.demo.call.participants.keys()]")) == sorted(
            {"ann", "ben", "cat"} - {await page.evaluate("window.demo.call.selfId")}
        )


async def test_a_cut_websocket_reconnects_resumes_and_the_call_recovers(browser, servers):
    """The server drops a page's socket: it reconnects, resumes its slot, and video keeps flowing."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice", token=make_token("alice", name="Alice"))
    bob = await open_demo(browser, signal, "bob", token=make_token("bob", name="Bob"))
    for page in (alice, bob):
        await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    hub = signal.app[SIGNALING].hub
    bob_slot = hub.rooms["call"].slots["bob"]
    await bob.evaluate("""() => {
      window.statuses = [];
      window.demo.call.on('status', status => window.statuses.push(status));
    }""")
    bob_slot.peer._transport.abort()  # no close frame: a network cut
    await wait_for(bob, "window.statuses.includes('reconnecting')", timeout=WAIT_MS)
    await wait_for(bob, "window.statuses.at(-1) === 'joined'", timeout=WAIT_MS)
    assert hub.rooms["call"].slots["bob"] is bob_slot  # the same slot, resumed
    assert hub.metrics.resumes >= 1
    before = await frames(alice)
    await wait_for(alice, frames_above(before + 10), timeout=WAIT_MS)
    await wait_for(bob, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    assert any("Connection lost" in m for m in await bob.evaluate("window.demo.messages"))
    assert await bob.locator("#banner").is_hidden()  # cleared once rejoined


async def test_a_reload_within_the_grace_shows_the_new_video(browser, servers):
    """Bob's network drops (no close frame) and he reloads within the grace: his new page resumes
    the held slot, so Alice sees no leave and keeps her peer connection; her tile must show his
    new stream (not the dead first one) and frames keep coming. (A plain reload closes with 1001,
    a clean leave: Alice would start over with a new peer connection, which proves nothing.)"""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice", token=make_token("alice", name="Alice"))
    bob = await open_demo(browser, signal, "bob", token=make_token("bob", name="Bob"))
    for page in (alice, bob):
        await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    hub = signal.app[SIGNALING].hub
    slot = hub.rooms["call"].slots["bob"]
    peer = "window.__bobPeer = window.demo.call.getPeerConnection('bob')"
    await alice.evaluate(f"() => {{ {peer}; }}")
    # The old page's reconnects hang on their config fetch, so only the reloaded page resumes the slot.
    blocking, hung = [True], []

    async def config(route: Any) -> None:
        if blocking[0]:
            hung.append(route)  # never answered
        else:
            await route.continue_()

    await bob.route("**/webrtc/config", config)
    slot.peer._transport.abort()
    await wait_for(bob, "document.body.dataset.status === 'reconnecting'", timeout=WAIT_MS)
    await bob.reload()
    await wait_for(bob, "window.demo?.ready === true", timeout=WAIT_MS)
    blocking[0] = False
    await bob.locator("#join").click()
    await joined(bob)
    assert hub.rooms["call"].slots["bob"] is slot  # resumed, not joined afresh
    stream = await bob.evaluate("window.demo.call.localStream.id")
    await wait_for(
        alice, """id => document.querySelector('.tile[data-user="bob"] video')?.srcObject?.id === id""",
        arg=stream, timeout=WAIT_MS,
    )
    assert await alice.evaluate("window.demo.call.getPeerConnection('bob') === window.__bobPeer")
    await wait_for(alice, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    before = await frames(alice, "bob")
    await wait_for(alice, frames_above(before + 10, "bob"), timeout=WAIT_MS)
    for route in hung:
        with contextlib.suppress(Exception):  # its page is long gone
            await route.abort()


@pytest.mark.signal_settings(max_participants=3)
async def test_a_fourth_page_in_a_room_of_three_sees_room_full(browser, servers):
    """The demo shows a clear ROOM_FULL message."""
    signal, _ = servers
    for user in ("ann", "ben", "cat"):
        await joined(await open_demo(browser, signal, user))
    fourth = await open_demo(browser, signal, "dan")
    banner = fourth.locator("#banner")
    await banner.get_by_text("ROOM_FULL").wait_for(timeout=WAIT_MS)
    assert "room is full" in (await banner.inner_text()).lower()


@pytest.mark.signal_settings(max_participants=1)
async def test_a_failed_join_turns_the_camera_off(browser, servers):
    """A refused join stops the camera it opened; a second Join opens one camera, and stops it again."""
    signal, _ = servers
    await joined(await open_demo(browser, signal, "ann"))
    page = await open_demo(browser, signal, "ben")
    await page.locator("#banner").get_by_text("ROOM_FULL").wait_for(timeout=WAIT_MS)
    await wait_for(page, "!document.querySelector('#join').disabled", timeout=WAIT_MS)
    assert await page.evaluate("window.__tracks.length") == 2
    assert await page.evaluate(LIVE_TRACKS) == 0
    await page.locator("#join").click()
    await wait_for(page, "window.demo.messages.length >= 2", timeout=WAIT_MS)
    await wait_for(page, "!document.querySelector('#join').disabled", timeout=WAIT_MS)
    assert await page.evaluate("window.__tracks.length") == 4
    assert await page.evaluate(LIVE_TRACKS) == 0
    assert await page.locator(".tile").count() == 0


async def test_joining_without_a_camera_receives_video(browser, servers):
    """'Join without camera': receive-only, the other side's video still arrives."""
    signal, _ = servers
    viewer = await open_demo(browser, signal, "viewer", query="receive_only=1")
    await joined(viewer)
    await open_demo(browser, signal, "speaker")
    await wait_for(viewer, frames_above(0, "speaker"), timeout=WAIT_MS)
    assert await viewer.evaluate("window.__tracks.length") == 0
    assert await viewer.locator("#mute").is_disabled() and await viewer.locator("#camera").is_disabled()
    assert await viewer.locator("#receive-only").is_checked()


async def test_an_unreachable_server_says_so(browser, servers):
    """The server is gone when Join is pressed: a message says so, the page stays usable."""
    signal, _ = servers
    page = await open_demo(browser, signal, "alice", join=False)
    await signal.close()
    await page.locator("#join").click()
    await page.locator("#banner").get_by_text("cannot be reached").wait_for(timeout=WAIT_MS)
    assert await page.locator("#join").is_enabled()


async def test_the_server_parameter_cannot_load_code_or_take_the_token(browser, servers):
    """?server=<another origin> neither imports that origin's module nor sends it a token."""
    signal, _ = servers
    seen: list[str] = []
    evil = web.Application()

    async def anything(request: web.Request) -> web.Response:
        seen.append(f"{request.path} {request.headers.get('Authorization', '')}")
        body = "window.pwned = true; document.title = 'pwned'; export class WebRTCCall {}"
        return web.Response(text=body, content_type="text/javascript", headers={"Access-Control-Allow-Origin": "*"})

    evil.router.add_route("*", "/{tail:.*}", anything)
    attacker = TestServer(evil, host="localhost")
    await attacker.start_server()
    try:
        page = await open_demo(
            browser, signal, "alice", query=f"server=http://localhost:{attacker.port}"
        )
        await joined(page)
        assert await page.evaluate("window.pwned") is None
        assert await page.title() != "pwned"
        assert seen == []
        assert any("ignored" in m for m in await page.evaluate("window.demo.messages"))
    finally:
        await attacker.close()


@pytest.mark.parametrize("width,height", [(1280, 720), (1440, 900), (1920, 1080)])
async def test_alone_in_a_room_the_controls_stay_in_view(browser, servers, width, height):
    """One tile fits between header and controls; no empty state badge on it; a screenshot for the record."""
    signal, _ = servers
    page = await open_demo(browser, signal, "alice", viewport={"width": width, "height": height})
    await joined(page)
    await wait_for(page, "document.querySelector('.tile video').videoWidth > 0", timeout=WAIT_MS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"alone-{width}x{height}.png"))
    footer = await page.locator("footer").bounding_box()
    tile = await page.locator(".tile").bounding_box()
    assert footer["y"] + footer["height"] <= height
    assert tile["y"] + tile["height"] <= footer["y"] and tile["y"] >= 0
    assert tile["width"] >= width / 3  # fills the space, not a thumbnail
    assert await page.locator("#leave").is_visible() and await page.locator("#leave").is_enabled()
    assert await page.locator(".tile .state").is_hidden()  # empty: no dark bar


async def test_a_page_load_and_join_log_no_errors(browser, servers):
    """No favicon request, no console errors, no failed requests, one dev token fetch per join."""
    signal, _ = servers
    problems: list[str] = []
    token_fetches: list[str] = []

    def listen(page: Any) -> None:
        page.on("request", lambda r: token_fetches.append(r.url) if "/dev/token" in r.url else None)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)

    page = await open_demo(browser, signal, "alice", listen=listen)
    await joined(page)
    assert problems == []
    assert len(token_fetches) == 1, token_fetches


async def test_rejoining_keeps_the_guest_identity(browser, servers):
    """Without a name, Join, Leave, Join (and a reload) are the same guest."""
    signal, _ = servers
    page = await open_demo(browser, signal, None)
    await joined(page)
    first = await page.evaluate("window.demo.call.selfId")
    assert first.startswith("guest-")
    await page.locator("#leave").click()
    await page.locator("#join").click()
    await joined(page)
    assert await page.evaluate("window.demo.call.selfId") == first
    await reload_and_join(page)
    await joined(page)
    assert await page.evaluate("window.demo.call.selfId") == first


async def test_a_restarted_dev_server_is_rejoined(browser, servers):
    """make run restarted (a new random secret): open tabs fetch a new dev token and join again."""
    signal, _ = servers
    page = await open_demo(browser, signal, "alice")
    await joined(page)
    port = signal.port
    await signal.close()
    await wait_for(page, "document.body.dataset.status === 'reconnecting'", timeout=WAIT_MS)
    settings = make_settings(jwt_secret="another-random-secret-after-a-restart-0123", dev_mode=True,
                             stun_urls=("stun:127.0.0.1:3478",))
    restarted = TestServer(create_standalone_app(settings), host="127.0.0.1", port=port)
    await restarted.start_server()
    try:
        await joined(page)
        assert not [m for m in await page.evaluate("window.demo.messages") if "refused" in m]
    finally:
        await restarted.close()


async def test_the_config_response_works_as_rtcpeerconnection_configuration(browser, servers):
    """The guide's quirk, in a real browser: the response passed straight to RTCPeerConnection."""
    signal, _ = servers
    page = await open_demo(browser, signal, "cfg")
    await joined(page)
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
    signal, _ = servers
    page = await open_demo(browser, signal, "eve", token=make_token("eve", ttl=-120))
    await page.locator("#banner").get_by_text("UNAUTHORIZED").wait_for(timeout=WAIT_MS)
    assert await page.evaluate(LIVE_TRACKS) == 0



# ------------------------------------------------------------- hostile links and peers


async def test_a_link_fills_in_the_form_and_never_joins_by_itself(browser, servers):
    """?autojoin=1&token=…: no join, no camera; the page shows whose token it is; Join (a click) uses it."""
    signal, _ = servers
    token = make_token("mallory", name="Mallory")
    page = await open_demo(browser, signal, None, room="trap", token=token, query="autojoin=1", join=False)
    assert await page.locator("#join").is_enabled()
    assert await page.evaluate("window.__tracks.length") == 0
    assert "trap" not in signal.app[SIGNALING].hub.rooms
    assert await page.locator("#token").input_value() == token and await page.locator("#token").is_visible()
    assert await page.locator("#token-owner").inner_text() == "Joins as user mallory (Mallory)"
    await page.locator("#join").click()
    await joined(page)
    assert await page.evaluate("window.demo.call.selfId") == "mallory"


async def test_another_site_cannot_frame_the_page(browser, servers):
    """frame-ancestors 'none' (and X-Frame-Options): a framing page gets an error page, nothing joins."""
    signal, _ = servers
    site = web.Application()
    demo = f"{signal_origin(signal)}/?room=framed&name=victim"

    async def framing(request: web.Request) -> web.Response:
        body = f'<!doctype html><iframe src="{demo}" onload="window.framed = true"></iframe>'
        return web.Response(text=body, content_type="text/html")

    site.router.add_get("/", framing)
    attacker = TestServer(site, host="localhost")
    await attacker.start_server()
    try:
        page = await (await browser.new_context()).new_page()
        await page.goto(f"http://localhost:{attacker.port}/")
        await page.wait_for_function("window.framed === true", timeout=WAIT_MS)
        (frame,) = page.main_frame.child_frames
        assert await frame.evaluate("typeof window.demo") == "undefined"
        assert not frame.url.startswith(signal_origin(signal))
    finally:
        await attacker.close()


async def test_the_call_works_under_the_pages_content_security_policy(browser, servers):
    """The demo's strict CSP is sent and enforced (an injected inline script never runs), and a call still works."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice")
    bob = await open_demo(browser, signal, "bob")
    for page in (alice, bob):
        await wait_for(page, CONNECTED_PEERS, arg=1)
        await wait_for(page, frames_above(0))
        assert await page.evaluate("window.__violations") == []
        assert await page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 17, 17)"
    ran = await alice.evaluate(
        """() => {
          const script = Object.assign(document.createElement('script'), {textContent: 'window.__inline = 1'});
          document.body.append(script);
          return window.__inline ?? null;
        }"""
    )
    assert ran is None
    assert await alice.evaluate("window.__violations") == ["script-src-elem"]


async def test_a_participant_whose_id_is_self_cannot_take_the_local_tile(browser, servers):
    """User id "self" named "You (alice)": a tile of its own; its leaving leaves Alice's preview alone."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice")
    await joined(alice)
    own = await alice.evaluate("window.demo.call.localStream.id")
    local = ".tile[data-self] video"
    async with ClientSession() as session:
        url = f"ws://127.0.0.1:{signal.port}/webrtc/ws/call?token={make_token('self', name='You (alice)')}"
        impostor = await session.ws_connect(url)
        await alice.locator('.tile[data-user="self"]').wait_for(timeout=WAIT_MS)
        assert await alice.evaluate(f"document.querySelector('{local}').srcObject.id") == own
        await impostor.close()
    await alice.locator('.tile[data-user="self"]').wait_for(state="detached", timeout=WAIT_MS)
    assert await alice.evaluate(f"document.querySelector('{local}').srcObject.id") == own
    assert await alice.locator(".tile[data-self] .label").inner_text() == "You (alice)"


async def test_what_another_participant_sends_never_reaches_the_banner(browser, servers):
    """A bad offer's parse error (attacker text) shows as a generic message; the kept messages are bounded."""
    signal, _ = servers
    alice = await open_demo(browser, signal, "alice")
    await joined(alice)
    await alice.evaluate("() => { window.errors = 0; window.demo.call.on('error', () => { window.errors += 1; }); }")
    lure = "Session expired - sign in again at https://evil.example/login"
    async with ClientSession() as session:
        mallory = await session.ws_connect(f"ws://127.0.0.1:{signal.port}/webrtc/ws/call?token={make_token('mallory')}")
        await mallory.send_json({"type": "offer", "payload": {
            "type": "offer", "sdp": f"v=0\r\n{lure}\r\n", "target_user_id": "alice"}})
        await wait_for(alice, "window.errors === 1")
        banner = await alice.locator("#banner").inner_text()
        assert "evil.example" not in banner and "SIGNALING_FAILED" in banner, banner
        for number in range(80):
            await mallory.send_json({"type": "answer", "payload": {
                "type": "answer", "sdp": f"v=0\r\n{lure} {number}\r\n", "target_user_id": "alice"}})
        await wait_for(alice, "window.errors === 81")
        messages = await alice.evaluate("window.demo.messages")
        assert len(messages) == 50 and not [m for m in messages if "evil.example" in m]
        await mallory.close()


async def test_url_parameters_never_change_the_stored_guest_identity(browser, servers):
    """?name=bob joins as bob once; the same tab's plain demo afterwards is its own guest again."""
    signal, _ = servers
    page = await open_demo(browser, signal, "bob", room="elsewhere")
    await joined(page)
    assert await page.evaluate("window.demo.call.selfId") == "bob"
    await open_and_join(page, f"{signal_origin(signal)}/?room=call")
    await joined(page)
    assert (await page.evaluate("window.demo.call.selfId")).startswith("guest-")


async def test_refused_session_storage_still_joins(browser, servers):
    """sessionStorage throws SecurityError (blocked storage): the page joins as a guest, no raw error."""
    signal, _ = servers
    refuse = """
Object.defineProperty(window, 'sessionStorage', {get() { throw new DOMException('insecure', 'SecurityError'); }});
"""
    page = await open_demo(browser, signal, None, init=refuse)
    await joined(page)
    assert (await page.evaluate("window.demo.call.selfId")).startswith("guest-")
    assert await page.evaluate("window.demo.messages") == []
