"""signal-client.js's lifecycle in headless Chromium: real networks, real trouble.

Each page is a harness on another origin (tests/realclients.py) holding one
``WebRTCCall`` as ``window.call``, with its events in ``window.events``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Any

import pytest
from aiohttp import ClientSession, ClientWebSocketResponse

from signal_server.context import SIGNALING

from .conftest import make_token
from .realclients import CONNECTED_PEERS, WAIT_MS, frames, frames_above, module_call
from .receipts import fully_confirmed
from .stallproxy import StallProxy

pytestmark = pytest.mark.netns


def origin(server: Any) -> str:
    return f"http://127.0.0.1:{server.port}"


def hub(signal: Any) -> Any:
    return signal.app[SIGNALING].hub


async def events(page: Any, kind: str) -> list[list[Any]]:
    return list(await page.evaluate("kind => window.events.filter(e => e.type === kind).map(e => e.args)", kind))


async def wait_status(page: Any, status: str, after: int = 0) -> None:
    """Wait for a status event ``status`` among the events from index ``after`` on."""
    await page.wait_for_function(
        "([status, after]) => window.events.slice(after).some(e => e.type === 'status' && e.args[0] === status)",
        arg=[status, after], timeout=WAIT_MS,
    )


async def event_count(page: Any) -> int:
    return int(await page.evaluate("window.events.length"))


def cut(signal: Any, user: str, room: str = "call") -> None:
    """Drop ``user``'s socket on the server side without a close frame."""
    hub(signal).rooms[room].slots[user].peer._transport.abort()


async def pair(browser: Any, signal: Any, page_server: Any, **kwargs: Any) -> tuple[Any, Any]:
    alice = await module_call(browser, page_server, origin(signal), "alice", **kwargs)
    bob = await module_call(browser, page_server, origin(signal), "bob", **kwargs)
    for page in (alice, bob):
        await page.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
    return alice, bob


async def test_two_pages_on_another_origin_connect_and_decode_video(browser, servers):
    """The module on another origin (CORS for the config, Origin for the socket): a call with video both ways."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server)
    for page in (alice, bob):
        await page.wait_for_function(frames_above(0), timeout=WAIT_MS)


async def test_a_dead_network_resumes_inside_the_grace(browser, servers):
    """The TCP path goes silent (no FIN, no RST): the module drops the socket, resumes at once; nobody sees a leave."""
    signal, page_server = servers
    proxy = await StallProxy("127.0.0.1", signal.port).start()
    try:
        alice = await module_call(browser, page_server, origin(signal), "alice")
        bob = await module_call(
            browser, page_server, f"http://127.0.0.1:{proxy.port}", "bob",
            options={"pingIntervalMs": 500, "staleAfterMs": 2000},
        )
        await alice.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
        resumes = hub(signal).metrics.resumes
        mark = await event_count(bob)
        assert proxy.stall() >= 1
        await wait_status(bob, "reconnecting", mark)
        # 20 s grace; Chromium's closing handshake would hold a politely closed socket for 60 s.
        await bob.wait_for_function(
            """after => window.events.slice(after).some(e => e.type === 'roomstate' && e.args[1].resumed)""",
            arg=mark, timeout=15_000,
        )
        assert hub(signal).metrics.resumes > resumes
        assert await events(alice, "participantleft") == []
        before = await frames(alice, "bob")
        await alice.wait_for_function(frames_above(before + 10, "bob"), timeout=WAIT_MS)
        await bob.wait_for_function(CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
        stale = await bob.evaluate("window.sockets.filter(s => s.readyState === WebSocket.OPEN).length")
        assert stale >= 1  # the dead socket was left behind, not waited for
    finally:
        await proxy.close()


@pytest.mark.signal_settings(heartbeat=1)  # the keepalive confirms what bob read, so the resume is recovered
async def test_signaling_sent_while_reconnecting_is_delivered_after_the_resume(browser, servers, monkeypatch):
    """An offer made while the socket is down is queued and flushed after room_state (recovered)."""
    signal, page_server = servers
    # No offer retry within the test's wait: the queue alone must deliver the offer.
    alice, bob = await pair(browser, signal, page_server, options={"offerTimeoutMs": 120_000})
    bob_peer = hub(signal).rooms["call"].slots["bob"].peer
    # The keepalive pings bob for what he has not confirmed; his pong confirms what he read.
    await asyncio.wait_for(fully_confirmed(monkeypatch, bob_peer).wait(), WAIT_MS / 1000)
    ufrag = "() => window.call.getPeerConnection('alice').remoteDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1]"
    before = await bob.evaluate(ufrag)
    await bob.evaluate("window.hold()")
    mark = await event_count(bob)
    cut(signal, "bob")
    await bob.wait_for_function("window.tokenWaiting === true", timeout=WAIT_MS)
    await bob.evaluate("window.call.getPeerConnection('alice').restartIce()")
    await bob.wait_for_function(
        "window.call.getPeerConnection('alice').signalingState === 'have-local-offer'", timeout=WAIT_MS
    )
    await bob.evaluate("window.release()")
    await bob.wait_for_function(
        """after => window.events.slice(after).some(e => e.type === 'roomstate' && e.args[1].recovered)""",
        arg=mark, timeout=WAIT_MS,
    )
    await bob.wait_for_function(
        f"""old => {{
          const pc = window.call.getPeerConnection('alice');
          return pc.signalingState === 'stable' && ({ufrag})() !== old;
        }}""",
        arg=before, timeout=WAIT_MS,
    )
    assert await events(alice, "participantleft") == []


async def test_a_takeover_shows_the_new_video_and_stops_the_old_tab(browser, servers):
    """Bob joins again from a second tab: Alice adopts the new stream; the old tab's camera and peers stop."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server)
    first = await alice.evaluate("window.call.getRemoteStream('bob').id")
    bob2 = await module_call(browser, page_server, origin(signal), "bob")
    await wait_status(bob, "failed")
    assert [args[1] for args in await events(bob, "error")] == ["SESSION_REPLACED"]
    assert await bob.evaluate("window.call.localStream") is None
    assert await bob.evaluate("window.call.getPeerConnection('alice')") is None
    assert await bob.evaluate(
        "window.sockets.every(s => s.readyState >= WebSocket.CLOSING)"
    ), "the replaced tab keeps no socket"
    new_stream = await bob2.evaluate("window.call.localStream.id")
    await alice.wait_for_function(
        "id => window.call.getRemoteStream('bob')?.id === id", arg=new_stream, timeout=WAIT_MS
    )
    assert new_stream != first
    before = await frames(alice, "bob")
    await alice.wait_for_function(frames_above(before + 10, "bob"), timeout=WAIT_MS)
    assert await events(alice, "participantleft") == []


async def test_disconnect_during_connect_never_joins(browser, servers):
    """React StrictMode: connect(), disconnect() at once, then a new call: one connection, the first rejected."""
    signal, page_server = servers
    page = await module_call(browser, page_server, origin(signal), "alice", media=False, connect=False)
    await page.evaluate("window.hold()")
    outcome = await page.evaluate(
        """async () => {
          const pending = window.call.connect()
            .then(() => 'joined', (e) => e instanceof window.M.SignalingError && e.code);
          await window.call.disconnect();
          return pending;
        }"""
    )
    assert outcome == "ABORTED"
    first = "window.first = window.call"
    await page.evaluate(first)
    await page.evaluate("window.release()")
    # The effect runs again with a new call; the first must stay out of the room.
    await page.evaluate(
        """([server, token]) => {
          window.setup(server, token, 'call', {});
          return window.call.connect().then(() => true);
        }""",
        [origin(signal), make_token("alice", name="Alice")],
    )
    assert await page.evaluate("window.first.status") == "closed"
    assert await page.evaluate("window.sockets.length") == 1
    assert await page.evaluate("window.call.status") == "joined"
    slot = hub(signal).rooms["call"].slots["alice"]
    assert slot.peer is not None


async def test_disconnect_during_a_reconnect_token_fetch_stays_closed(browser, servers):
    """disconnect() while a reconnect waits for its token: no hidden socket rejoins afterwards."""
    signal, page_server = servers
    page = await module_call(browser, page_server, origin(signal), "alice", media=False)
    await page.evaluate("window.hold()")
    cut(signal, "alice")
    await page.wait_for_function("window.tokenWaiting === true", timeout=WAIT_MS)
    await page.evaluate("window.call.disconnect()")
    await page.evaluate("window.release()")
    # The reconnect's token arrived; a getConfig() needs a token and a fetch, longer than that step.
    await page.evaluate("window.call.getConfig()")
    assert await page.evaluate("window.sockets.length") == 1
    assert await page.evaluate("window.call.status") == "closed"


async def test_a_camera_started_after_connect_is_sent(browser, servers):
    """initLocalStream() after connect(): the peer decodes video; replaceTrack() switches the source."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server, media=False)
    await alice.evaluate("window.call.initLocalStream({video: {width: 320, height: 240}, audio: true})")
    await bob.wait_for_function(frames_above(0, "alice"), timeout=WAIT_MS)
    switched = await alice.evaluate(
        """async () => {
          const old = window.call.localStream.getVideoTracks()[0];
          const canvas = Object.assign(document.createElement('canvas'), {width: 160, height: 120});
          const context = canvas.getContext('2d');
          setInterval(() => {
            context.fillStyle = `hsl(${Date.now() % 360}, 80%, 50%)`;
            context.fillRect(0, 0, 160, 120);
          }, 50);
          const track = canvas.captureStream(20).getVideoTracks()[0];
          await window.call.replaceTrack(track);
          const sender = window.call.getPeerConnection('bob').getSenders().find(s => s.track?.kind === 'video');
          return {sent: sender.track === track, oldEnded: old.readyState === 'ended'};
        }"""
    )
    assert switched == {"sent": True, "oldEnded": True}
    before = await frames(bob, "alice")
    await bob.wait_for_function(frames_above(before + 10, "alice"), timeout=WAIT_MS)


# A camera that opens only when the test says so (a permission prompt the user answers late).
SLOW_CAMERA = """() => {
  const capture = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  window.captured = [];
  window.cameraGate = new Promise((resolve) => { window.openCamera = resolve; });
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    window.cameraWaiting = true;
    await window.cameraGate;
    const stream = await capture(constraints);
    window.captured.push(...stream.getTracks());
    return stream;
  };
}"""
LIVE_CAPTURED = "window.captured.filter(t => t.readyState === 'live').length"


async def test_a_camera_still_opening_at_disconnect_is_stopped(browser, servers):
    """StrictMode with a camera: initLocalStream(); connect(); disconnect() before the camera opens.
    The camera that opens afterwards is stopped at once and initLocalStream() rejects with ABORTED."""
    signal, page_server = servers
    page = await module_call(browser, page_server, origin(signal), "alice", media=False, connect=False)
    await page.evaluate(SLOW_CAMERA)
    outcome = await page.evaluate(
        """async () => {
          const call = window.call;
          const media = call.initLocalStream({video: true, audio: true}).then(() => 'resolved', (e) => e.code);
          const joined = call.connect().then(() => 'joined', (e) => e.code);
          await call.disconnect();
          window.openCamera();
          return [await media, await joined, call.localStream, call.status];
        }"""
    )
    assert outcome == ["ABORTED", "ABORTED", None, "closed"]
    assert await page.evaluate("window.captured.length") == 2
    assert await page.evaluate(LIVE_CAPTURED) == 0


async def test_a_camera_still_opening_at_a_fatal_error_is_stopped(browser, servers):
    """SESSION_REPLACED while the camera opens: the failed call holds no media once it opens."""
    signal, page_server = servers
    bob = await module_call(browser, page_server, origin(signal), "bob", media=False)
    await bob.evaluate(SLOW_CAMERA)
    await bob.evaluate("() => { window.media = window.call.initLocalStream().then(() => 'resolved', (e) => e.code); }")
    await bob.wait_for_function("window.cameraWaiting === true", timeout=WAIT_MS)
    await module_call(browser, page_server, origin(signal), "bob", media=False)
    await wait_status(bob, "failed")
    await bob.evaluate("window.openCamera()")
    assert await bob.evaluate("window.media") == "ABORTED"
    assert await bob.evaluate("window.call.localStream") is None
    assert await bob.evaluate("window.captured.length") == 2
    assert await bob.evaluate(LIVE_CAPTURED) == 0


@pytest.mark.signal_settings(max_connections=1)
async def test_connect_to_a_full_server_rejects_once(browser, servers):
    """SERVER_BUSY: connect() rejects after a bounded number of attempts, and the error is reported once."""
    signal, page_server = servers
    async with ClientSession() as session:
        holder = await session.ws_connect(f"ws://127.0.0.1:{signal.port}/webrtc/ws/call?token={make_token('zoe')}")
        page = await module_call(browser, page_server, origin(signal), "alice", media=False, connect=False)
        outcome = await page.evaluate(
            "window.call.connect().then(() => 'joined', e => [e instanceof window.M.SignalingError, e.code])"
        )
        assert outcome == [True, "SERVER_BUSY"]
        assert [args[1] for args in await events(page, "error")] == ["SERVER_BUSY"]
        assert await page.evaluate("window.sockets.length") == 3  # connectAttempts (default 3)
        assert await page.evaluate("window.call.status") == "failed"
        await holder.close()


async def test_connect_to_a_dead_server_rejects_with_a_signaling_error(browser, servers):
    """Nothing listens: connect() rejects with SignalingError NETWORK_ERROR, reported once."""
    signal, page_server = servers
    page = await module_call(browser, page_server, "http://127.0.0.1:9", "alice", media=False, connect=False)
    outcome = await page.evaluate(
        "window.call.connect().then(() => 'joined', e => [e instanceof window.M.SignalingError, e.code, e.message])"
    )
    assert outcome[:2] == [True, "NETWORK_ERROR"] and outcome[2].startswith("NETWORK_ERROR")
    assert [args[1] for args in await events(page, "error")] == ["NETWORK_ERROR"]


async def test_an_origin_the_server_refuses_is_named_in_the_error_and_logged(browser, servers, caplog):
    """The page's origin is not in --allowed-origin: the browser only sees a failed fetch, so
    NETWORK_ERROR names the likely causes (origin, certificate, server down), and the server
    logs the refused origin with the option to set."""
    from .realclients import start_signal_server

    caplog.set_level(logging.INFO, logger="signal_server.hints")
    _, page_server = servers
    signal = await start_signal_server(
        allowed_origins=("https://app.example",), dev_mode=True, stun_urls=("stun:127.0.0.1:3478",),
    )
    try:
        page = await module_call(browser, page_server, origin(signal), "alice", media=False, connect=False)
        outcome = await page.evaluate(
            "window.call.connect().then(() => 'joined', e => [e instanceof window.M.SignalingError, e.code, e.message])"
        )
    finally:
        await signal.close()
    assert outcome[:2] == [True, "NETWORK_ERROR"]
    assert "--allowed-origin" in outcome[2] and "certificate" in outcome[2] and "down" in outcome[2]
    page_origin = f"'http://localhost:{page_server.port}'"
    assert any(page_origin in line and "--allowed-origin" in line for line in caplog.messages), caplog.messages


async def test_a_token_function_that_refuses_ends_connect_with_its_code(browser, servers):
    """The app's token function throws {code: 'UNAUTHORIZED'}: a final SignalingError, no retries."""
    signal, page_server = servers
    page = await module_call(browser, page_server, origin(signal), "alice", media=False, connect=False)
    outcome = await page.evaluate(
        """server => {
          let calls = 0;
          const refuse = async () => {
            calls += 1;
            throw Object.assign(new Error('UNAUTHORIZED: log in again'), {code: 'UNAUTHORIZED'});
          };
          const call = new window.M.WebRTCCall(server, refuse, 'call');
          return call.connect().then(() => 'joined', e => [e instanceof window.M.SignalingError, e.code, calls]);
        }""",
        origin(signal),
    )
    assert outcome == [True, "UNAUTHORIZED", 1]


@pytest.mark.signal_settings(turn_urls=("turn:127.0.0.1:3478",), turn_secret="turn-secret-for-tests", turn_ttl=600)
async def test_a_reconnect_refetches_the_ice_configuration(browser, servers):
    """Every (re)connection fetches /webrtc/config again and the kept peers use the fresh TURN credentials."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server, media=False)
    fetched = await bob.evaluate("window.configs.length")
    mark = await event_count(bob)
    cut(signal, "bob")
    await bob.wait_for_function(
        "after => window.events.slice(after).some(e => e.type === 'roomstate' && e.args[1].resumed)",
        arg=mark, timeout=WAIT_MS,
    )
    assert await bob.evaluate("window.configs.length") > fetched
    latest, used = await bob.evaluate(
        """() => {
          const turn = servers => servers.find(s => [].concat(s.urls).some(u => u.startsWith('turn:')));
          return [turn(window.configs.at(-1).iceServers).username,
                  turn(window.call.getPeerConnection('alice').getConfiguration().iceServers).username];
        }"""
    )
    assert latest == used


ICE_LOG = """port => {
  // Every ICE candidate this page sends points at the given port, where nothing listens: no pair can work.
  const send = window.WebSocket.prototype.send;
  window.WebSocket.prototype.send = function (data) {
    return send.call(this, data.replace(/(candidate:\\S+ \\d+ \\S+ \\d+ \\S+ )\\d+/g, `$1${port}`));
  };
  // What the test reads, in order: config fetches (by TURN username), ICE failures,
  // setConfiguration calls (by TURN username) and restartIce calls.
  const log = window.iceLog = [];
  const fetchBefore = window.fetch;
  window.fetch = async (...args) => {
    const response = await fetchBefore(...args);
    if (String(args[0]).endsWith('/config')) {
      log.push(['config', (await response.clone().json()).iceServers[0].username]);
    }
    return response;
  };
  const proto = RTCPeerConnection.prototype;
  const setConfiguration = proto.setConfiguration, restartIce = proto.restartIce;
  proto.setConfiguration = function (config) {
    log.push(['setConfiguration', config.iceServers[0]?.username]);
    return setConfiguration.call(this, config);
  };
  proto.restartIce = function () { log.push(['restartIce']); return restartIce.call(this); };
  window.call.on('connectionstatechange', (id, state) => { if (state === 'failed') log.push(['failed']); });
  return true;
}"""


async def test_an_ice_restart_after_failure_uses_a_refetched_configuration(browser, servers):
    """ICE fails: /webrtc/config is fetched again, its servers applied (setConfiguration), then restartIce.

    Every ICE candidate either page sends (trickled or in an SDP) is rewritten to a closed loopback port,
    and the TURN server given is on that port too, so every pair fails and the connection reaches
    ``failed``. (A relay-only policy with an unreachable TURN server is not enough: with no candidate
    at all Chromium leaves ICE at ``new`` for good.) Each config served carries a new TURN username,
    as expired REST credentials would be replaced; the restart must use one fetched after the failure,
    not the one from connect().
    """
    signal, page_server = servers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there (the namespace is the test's own)
    turn = f"turn:127.0.0.1:{closed_port}?transport=tcp"
    served: list[str] = []

    async def config(route: Any) -> None:
        assert route.request.headers["authorization"].startswith("Bearer ")
        served.append(f"expiring-{len(served)}")
        body = {"iceServers": [{"urls": turn, "username": served[-1], "credential": "x"}]}
        await route.fulfill(json=body, headers={"Access-Control-Allow-Origin": "*"})

    pages = []
    for user in ("alice", "bob"):
        page = await module_call(browser, page_server, origin(signal), user, media=False, connect=False)
        await page.route("**/webrtc/config", config)
        await page.evaluate(ICE_LOG, closed_port)
        await page.evaluate("window.call.connect().then(() => true)")
        pages.append(page)
    bob = pages[1]
    await bob.wait_for_function(
        """() => {
          const failed = window.iceLog.findIndex(e => e[0] === 'failed');
          return failed >= 0 && window.iceLog.slice(failed).some(e => e[0] === 'restartIce');
        }""",
        timeout=WAIT_MS * 3,  # Chromium gives up on a pair that never answers after about 15 s

    )
    log = await bob.evaluate("window.iceLog")
    failed = log.index(["failed"])
    joined_with = log[0]
    assert joined_with[0] == "config", log
    after = log[failed + 1:]
    restart = after.index(["restartIce"])
    fetched = [entry[1] for entry in after[:restart] if entry[0] == "config"]
    applied = [entry[1] for entry in after[:restart] if entry[0] == "setConfiguration"]
    assert fetched, f"no /webrtc/config fetch between the failure and restartIce: {log}"
    assert applied and applied[-1] == fetched[-1] != joined_with[1], log
    assert after.index(["config", fetched[-1]]) < after.index(["setConfiguration", fetched[-1]]), log
    in_use = await bob.evaluate("window.call.getPeerConnection('alice').getConfiguration().iceServers[0].username")
    assert in_use in served and in_use != joined_with[1]


async def test_listeners_media_switches_and_public_state(browser, servers):
    """on()/off() with several listeners, idempotent microphone/camera switches, remotestreamremoved, no internals."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server)
    result = await alice.evaluate(
        """() => {
          const call = window.call, seen = [];
          const one = (s) => seen.push(['one', s]), two = (s) => seen.push(['two', s]);
          call.on('status', one);
          const removeTwo = call.on('status', two);
          call.on('status', one);  // a Set: the same listener once
          call.off('status', one);
          removeTwo();
          const audio = [call.setMicrophoneEnabled(false), call.setMicrophoneEnabled(false),
                         call.localStream.getAudioTracks()[0].enabled, call.setMicrophoneEnabled(true)];
          const video = [call.setCameraEnabled(false), call.setCameraEnabled(false), call.setCameraEnabled(true),
                         call.setCameraEnabled(true)];
          let unknown = null;
          try { call.on('nonsense', one); } catch (e) { unknown = e.name; }
          return {seen, audio, video, unknown, keys: Object.keys(call).filter(k => !k.startsWith('on')),
                  peers: 'peers' in call, ws: '_send' in call};
        }"""
    )
    assert result == {
        "seen": [], "audio": [False, False, False, True], "video": [False, False, True, True],
        "unknown": "TypeError", "keys": [], "peers": False, "ws": False,
    }
    await bob.evaluate("window.call.disconnect()")
    await alice.wait_for_function(
        "window.events.some(e => e.type === 'remotestreamremoved' && e.args[0] === 'bob')", timeout=WAIT_MS
    )
    assert await alice.evaluate("window.call.getRemoteStream('bob')") is None


async def local_offer(page: Any, kinds: tuple[str, ...] = ("audio",)) -> str:
    """A real offer SDP (audio, or ``kinds``), from a connection of its own in ``page``."""
    return str(await page.evaluate(
        """async (kinds) => {
          const pc = new RTCPeerConnection();
          for (const kind of kinds) pc.addTransceiver(kind);
          await pc.setLocalDescription();
          return pc.localDescription.sdp;
        }""",
        list(kinds),
    ))


async def raw_member(session: ClientSession, signal: Any, page_server: Any, user: str) -> ClientWebSocketResponse:
    """``user`` in room "call" over a plain WebSocket, with the page's Origin."""
    url = f"ws://127.0.0.1:{signal.port}/webrtc/ws/call?token={make_token(user)}"
    return await session.ws_connect(url, headers={"Origin": f"http://localhost:{page_server.port}"})


async def test_candidates_before_the_offer_are_queued_not_lost(browser, servers):
    """A candidate that arrives before its offer is added once the offer lands (not thrown away)."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False)
    offer = await local_offer(alice)
    async with ClientSession() as session:
        ws = await raw_member(session, signal, page_server, "mallory")
        await ws.receive_json(timeout=5)  # room_state
        candidate = "candidate:1 1 udp 2122260223 127.0.0.1 9 typ host"
        await ws.send_json({"type": "ice_candidate", "payload": {
            "candidate": candidate, "sdp_mid": "0", "sdp_m_line_index": 0, "target_user_id": "alice"}})
        await ws.send_json({"type": "offer", "payload": {"type": "offer", "sdp": offer, "target_user_id": "alice"}})
        await alice.wait_for_function(
            """() => (window.call.getPeerConnection('mallory')?.remoteDescription?.sdp ?? '')
              .includes('127.0.0.1 9 typ host')""",
            timeout=WAIT_MS,
        )
        assert await events(alice, "error") == []
        await ws.close()


async def test_a_failed_remote_answer_does_not_break_later_glare_handling(browser, servers):
    """A bad answer that throws must not leave 'setting remote answer' set: a glaring offer is still ignored."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False)
    sdp = await local_offer(alice)
    async with ClientSession() as session:
        mallory = await raw_member(session, signal, page_server, "mallory")

        async def receive(kind: str) -> dict[str, Any]:
            while True:
                message: dict[str, Any] = await mallory.receive_json(timeout=WAIT_MS / 1000)
                if message["type"] == kind:
                    return message

        async def send(kind: str, text: str) -> None:
            await mallory.send_json({"type": kind, "payload": {"type": kind, "sdp": text, "target_user_id": "alice"}})

        await receive("room_state")
        await send("offer", sdp)
        await receive("answer")
        # Alice (impolite: "alice" < "mallory") offers; Mallory's answer is broken; then Mallory's offer glares.
        await alice.evaluate("window.call.getPeerConnection('mallory').restartIce()")
        await receive("offer")
        await send("answer", "v=0 broken")
        await alice.wait_for_function("window.events.filter(e => e.type === 'error').length === 1", timeout=WAIT_MS)
        await send("offer", sdp)
        await send("answer", "v=0 broken again")  # a marker: processed after the glaring offer
        await alice.wait_for_function("window.events.filter(e => e.type === 'error').length === 2", timeout=WAIT_MS)
        # Impolite Alice ignored the glaring offer: no answer came back (a ping's pong comes after anything sent).
        await mallory.send_json({"type": "ping"})
        kinds: list[str] = []
        while not kinds or kinds[-1] != "pong":
            kinds.append((await mallory.receive_json(timeout=WAIT_MS / 1000))["type"])
        assert "answer" not in kinds, kinds
        await mallory.close()


async def test_reconnect_backoff_is_full_jitter(browser, servers):
    """The first retry delay is random in [0, 250 ms): with Math.random() = 0 it is 0 (equal jitter: 125)."""
    signal, page_server = servers
    page = await module_call(browser, page_server, origin(signal), "alice", media=False)
    await page.evaluate(
        """() => {
          window.delays = [];
          const native = window.setTimeout;
          window.setTimeout = (fn, ms, ...rest) => { window.delays.push(ms); return native(fn, ms, ...rest); };
          Math.random = () => 0;
        }"""
    )
    mark = await event_count(page)
    cut(signal, "alice")
    await wait_status(page, "joined", mark)
    assert (await page.evaluate("window.delays"))[:1] == [0]


def _admin(signal: Any) -> dict[str, str]:
    """An admin token signed with the dev server's secret."""
    from signal_server.auth import mint_token

    secret = signal.app[SIGNALING].settings.jwt_secret
    return {"Authorization": f"Bearer {mint_token(secret, 'backend', admin=True)}"}


async def test_a_kicked_call_fails_and_never_reconnects(browser, servers):
    """KICKED is final: status failed, the error reported once, no second socket, the camera off;
    a server message reaches the app first; the other side sees participantleft with reason kicked."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server)
    async with ClientSession() as session:
        base = f"{origin(signal)}/webrtc/rooms/call"
        async with session.post(f"{base}/messages", headers=_admin(signal), json={"payload": {"n": 1}}) as response:
            assert response.status == 200
        await bob.wait_for_function("window.events.some(e => e.type === 'servermessage')", timeout=WAIT_MS)
        assert await events(bob, "servermessage") == [[{"n": 1}]]
        async with session.delete(f"{base}/participants/bob", headers=_admin(signal)) as response:
            assert response.status == 200
    await wait_status(bob, "failed")
    await alice.wait_for_function("window.events.some(e => e.type === 'participantleft')", timeout=WAIT_MS)
    assert [args[1] for args in await events(alice, "participantleft")] == ["kicked"]
    assert [args[1] for args in await events(bob, "error")] == ["KICKED"]
    assert await bob.evaluate("window.call.localStream") is None
    # "failed" is final (no retry is scheduled from it); one socket was ever opened.
    assert await bob.evaluate("window.call.status") == "failed"
    assert await bob.evaluate("window.sockets.length") == 1
    assert await bob.evaluate("window.sockets.every(s => s.readyState >= WebSocket.CLOSING)")
    assert "bob" not in hub(signal).rooms["call"].slots


async def test_a_closed_room_ends_every_call(browser, servers):
    """ROOM_CLOSED is final for everyone in the room."""
    signal, page_server = servers
    alice, bob = await pair(browser, signal, page_server)
    async with ClientSession() as session:
        async with session.delete(f"{origin(signal)}/webrtc/rooms/call", headers=_admin(signal)) as response:
            assert response.status == 200
    for page in (alice, bob):
        await wait_status(page, "failed")
        assert [args[1] for args in await events(page, "error")] == ["ROOM_CLOSED"]
        assert await page.evaluate("window.sockets.length") == 1
    assert "call" not in hub(signal).rooms


# ------------------------------------------------------------- hostile peers


def many_sections(count: int, kind: str = "audio") -> str:
    """A valid offer with ``count`` minimal bundled media sections (``application`` for data channels)."""
    mids = " ".join(str(i) for i in range(count))
    sdp = (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        f"a=group:BUNDLE {mids}\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
        f"a=fingerprint:sha-256 {':'.join(['AB'] * 32)}\r\na=setup:actpass\r\n"
    )
    for mid in range(count):
        if kind == "application":
            sdp += f"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\n"
            sdp += "a=sctp-port:5000\r\n"
        else:
            sdp += f"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:{mid}\r\na=sendrecv\r\n"
            sdp += "a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n"
    return sdp


class Raw:
    """A hostile room member on a plain WebSocket: what it sends, what it got."""

    def __init__(self, ws: ClientWebSocketResponse, target: str = "alice") -> None:
        self.ws, self.target = ws, target
        self.got: list[dict[str, Any]] = []

    async def send(self, kind: str, **payload: Any) -> None:
        await self.ws.send_json({"type": kind, "payload": {**payload, "target_user_id": self.target}})

    async def receive(self, kind: str) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = await self.ws.receive_json(timeout=WAIT_MS / 1000)
            self.got.append(message)
            if message["type"] == kind:
                return message

    async def flush(self) -> list[str]:
        """Everything the server sent us before the pong to a ping of ours (types)."""
        await self.ws.send_json({"type": "ping"})
        await self.receive("pong")
        return [message["type"] for message in self.got]


async def test_an_offer_with_more_sections_than_a_call_uses_is_refused(browser, servers):
    """200 m-lines (an answer over 64 KiB) or a data channel: refused, no answer, the socket stays open."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False)
    async with ClientSession() as session:
        mallory = Raw(await raw_member(session, signal, page_server, "mallory"))
        await mallory.receive("room_state")
        await mallory.send("offer", type="offer", sdp=many_sections(200))
        await mallory.send("offer", type="offer", sdp=many_sections(1, "application"))
        await alice.wait_for_function("window.events.filter(e => e.type === 'error').length >= 2", timeout=WAIT_MS)
        assert [args[1] for args in await events(alice, "error")] == ["OFFER_REFUSED", "OFFER_REFUSED"]
        assert "answer" not in await mallory.flush()
        assert await alice.evaluate("window.sockets.length") == 1
        assert await alice.evaluate("window.call.status") == "joined"
        # A call's own offer (one audio section) is still answered.
        await mallory.send("offer", type="offer", sdp=await local_offer(alice))
        await mallory.receive("answer")
        await mallory.ws.close()


async def test_a_frame_over_the_message_size_is_not_sent_and_that_peer_is_closed(browser, servers):
    """An answer over maxMessageSize: MESSAGE_TOO_LARGE reported, that peer closed, the socket kept."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False,
                              options={"maxMessageSize": 1024})
    async with ClientSession() as session:
        mallory = Raw(await raw_member(session, signal, page_server, "mallory"))
        await mallory.receive("room_state")
        await mallory.send("offer", type="offer", sdp=await local_offer(alice))
        await alice.wait_for_function("window.events.some(e => e.type === 'error')", timeout=WAIT_MS)
        assert [args[1] for args in await events(alice, "error")] == ["MESSAGE_TOO_LARGE"]
        assert await alice.evaluate("window.call.getPeerConnection('mallory')") is None
        assert "answer" not in await mallory.flush()
        assert await alice.evaluate("window.sockets.length") == 1
        await mallory.ws.close()


def with_ufrag(sdp: str, ufrag: str) -> str:
    return re.sub(r"a=ice-ufrag:\S+", f"a=ice-ufrag:{ufrag}", sdp)


async def test_a_flood_of_offers_is_coalesced(browser, servers):
    """30 offers at once: answered at most twice a second, the newest offer wins."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False)
    sdp = await local_offer(alice, ("audio", "video"))  # all a call uses: Alice has nothing to add (no glare)
    async with ClientSession() as session:
        mallory = Raw(await raw_member(session, signal, page_server, "mallory"))
        await mallory.receive("room_state")
        for number in range(30):
            await mallory.send("offer", type="offer", sdp=with_ufrag(sdp, f"flood{number:04d}"))
        await alice.wait_for_function(
            "() => window.call.getPeerConnection('mallory')?.remoteDescription?.sdp.includes('flood0029')",
            timeout=WAIT_MS,
        )
        await alice.wait_for_function(
            "window.call.getPeerConnection('mallory').signalingState === 'stable'", timeout=WAIT_MS
        )
        answers = (await mallory.flush()).count("answer")
        assert 1 <= answers <= 3, answers
        assert await events(alice, "error") == []
        await mallory.ws.close()


async def test_early_candidates_are_bounded_and_bad_ones_do_not_stop_the_answer(browser, servers):
    """150 early candidates keep 100; a 2 KiB one is dropped; one without mid and index does not abort the answer."""
    signal, page_server = servers
    alice = await module_call(browser, page_server, origin(signal), "alice", media=False)
    offer = await local_offer(alice)
    async with ClientSession() as session:
        mallory = Raw(await raw_member(session, signal, page_server, "mallory"))
        await mallory.receive("room_state")
        await mallory.send("ice_candidate", candidate="candidate:1 1 udp 2122260223 127.0.0.1 7 typ host",
                           sdp_mid=None, sdp_m_line_index=None)
        long = "candidate:1 1 udp 2122260223 127.0.0.1 8 typ host generation 0 x " + "A" * 2048
        await mallory.send("ice_candidate", candidate=long, sdp_mid="0", sdp_m_line_index=0)
        for port in range(1000, 1150):
            await mallory.send("ice_candidate", candidate=f"candidate:1 1 udp 2122260223 127.0.0.1 {port} typ host",
                               sdp_mid="0", sdp_m_line_index=0)
        await mallory.send("offer", type="offer", sdp=offer)
        await mallory.receive("answer")
        remote = await alice.evaluate("window.call.getPeerConnection('mallory').remoteDescription.sdp")
        ports = re.findall(r"a=candidate:1 1 udp 2122260223 127\.0\.0\.1 (\d+) typ host", remote)
        assert ports == [str(port) for port in range(1000, 1099)]  # 100 kept (7 among them, refused); 8 dropped
        assert [args[1] for args in await events(alice, "error")] == ["SIGNALING_FAILED"]  # reported once
        await mallory.ws.close()


async def test_an_offer_that_is_never_answered_is_rolled_back_and_tried_again(browser, servers):
    """No answer: after offerTimeoutMs the offer is rolled back and made again (fresh ICE); answered, it connects."""
    signal, page_server = servers
    async with ClientSession() as session:
        mallory = Raw(await raw_member(session, signal, page_server, "mallory"))
        await mallory.receive("room_state")
        alice = await module_call(browser, page_server, origin(signal), "alice", media=False,
                                  options={"offerTimeoutMs": 1500})
        first = await mallory.receive("offer")
        second = await mallory.receive("offer")
        ufrag = re.compile(r"a=ice-ufrag:(\S+)")
        assert ufrag.findall(first["payload"]["sdp"]) != ufrag.findall(second["payload"]["sdp"])
        # Answered from now on: Alice's current offer, and again after each retry (on a slow
        # machine an answer may come after her next retry, which the next answer settles).

        async def answer_every_offer() -> None:
            current = "window.call.getPeerConnection('mallory').localDescription.sdp"  # with its candidates
            while True:
                await mallory.send("answer", type="answer", sdp=await answer_for(alice, await alice.evaluate(current)))
                await mallory.receive("offer")

        answering = asyncio.ensure_future(answer_every_offer())
        try:
            await alice.wait_for_function(
                "window.call.getPeerConnection('mallory').connectionState === 'connected'", timeout=WAIT_MS
            )
        finally:
            answering.cancel()
        assert await events(alice, "error") == []
        await mallory.ws.close()


async def answer_for(page: Any, offer: str) -> str:
    """A real answer to ``offer``, from a connection of its own in ``page``."""
    return str(await page.evaluate(
        """async (sdp) => {
          const pc = new RTCPeerConnection();
          await pc.setRemoteDescription({type: 'offer', sdp});
          await pc.setLocalDescription();
          return pc.localDescription.sdp;
        }""",
        offer,
    ))


@pytest.mark.signal_settings(rate_limit=4, rate_burst=8)
async def test_signaling_is_paced_under_the_servers_rate_limit(browser, servers):
    """Joining a room of four: offers and candidates go out paced (sendRate), so the server drops nothing."""
    signal, page_server = servers
    async with ClientSession() as session:
        members = [Raw(await raw_member(session, signal, page_server, f"m{n}")) for n in range(4)]
        for member in members:
            await member.receive("room_state")
        await module_call(browser, page_server, origin(signal), "alice", options={"sendRate": 3, "sendBurst": 6})
        for member in members:
            await member.receive("offer")
            await member.receive("ice_candidate")
        assert hub(signal).metrics.rate_limited == 0
        for member in members:
            await member.ws.close()


@pytest.mark.signal_settings(rate_limit=5, rate_burst=10)
async def test_a_dropped_message_is_reported_once_and_renegotiated(browser, servers):
    """A non-fatal RATE_LIMITED: reported once, every peer renegotiates; a later cut is not blamed on it."""
    signal, page_server = servers
    options = {"sendRate": 4, "sendBurst": 8}
    alice, bob = await pair(browser, signal, page_server, media=False, options=options)
    ufrag = "() => window.call.getPeerConnection('bob').localDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1]"
    before = await alice.evaluate(ufrag)
    # Something else on the page floods the socket: the server drops and says RATE_LIMITED (no close).
    await alice.evaluate("() => { for (let i = 0; i < 30; i++) window.sockets.at(-1).send('{\"type\": \"ping\"}'); }")
    await alice.wait_for_function("window.events.some(e => e.type === 'error')", timeout=WAIT_MS)
    await alice.wait_for_function(
        f"""old => {{
          const pc = window.call.getPeerConnection('bob');
          return pc.signalingState === 'stable' && ({ufrag})() !== old && pc.connectionState === 'connected';
        }}""",
        arg=before, timeout=WAIT_MS,
    )
    assert [args[1] for args in await events(alice, "error")] == ["RATE_LIMITED"]
    assert await alice.evaluate("window.sockets.length") == 1
    mark = await event_count(alice)
    cut(signal, "alice")
    await wait_status(alice, "joined", mark)
    assert [args[1] for args in await events(alice, "error")] == ["RATE_LIMITED", "CONNECTION_LOST"]
