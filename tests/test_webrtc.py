"""A second WebRTC stack: aiortc peers signalling through the server, the guide's way.

The aiortc side below behaves like the integration guide's client: it offers
to the room without a target once it sees more than one participant, answers
to ``payload.sender_id``, and sends snake_case ICE candidates.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp

from .conftest import TIMEOUT, make_token
from .realclients import (
    CONNECTED_PEERS,
    WAIT_MS,
    frames_above,
    launch_browser,
    open_and_join,
    require_loopback_only,
    start_signal_server,
    wait_for,
)

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def loopback_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice skips 127.0.0.1 when gathering; in the namespace it is the only address."""
    require_loopback_only()
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
async def signal() -> AsyncIterator[Any]:
    server = await start_signal_server()
    yield server
    await server.close()


class GuideStylePeer:
    """An aiortc peer that speaks signaling exactly like the guide's WebRTCService."""

    def __init__(self, ws: ClientWebSocketResponse, pc: RTCPeerConnection) -> None:
        self.ws = ws
        self.pc = pc
        self.room_state: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read())

    async def send(self, kind: str, payload: dict[str, Any]) -> None:
        # The guide also sends room_id and a client timestamp; the server ignores both.
        await self.ws.send_str(json.dumps({"type": kind, "payload": payload, "room_id": "x", "timestamp": "t"}))

    async def offer_to_room(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self.send("offer", {"type": "offer", "sdp": self.pc.localDescription.sdp})  # no target
        await self._send_candidates()

    async def _send_candidates(self) -> None:
        """aiortc puts candidates in the SDP; send them the guide's trickle way too."""
        for line in self.pc.localDescription.sdp.splitlines():
            if line.startswith("a=candidate:"):
                await self.send("ice_candidate", {"candidate": line[2:], "sdp_mid": "0", "sdp_m_line_index": 0})

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is not WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            payload = data["payload"]
            if data["type"] == "room_state" and not self.room_state.done():
                self.room_state.set_result(payload)
            elif data["type"] == "offer":
                await self.pc.setRemoteDescription(RTCSessionDescription(payload["sdp"], payload["type"]))
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.send(
                    "answer",
                    {"type": "answer", "sdp": self.pc.localDescription.sdp, "target_user_id": payload["sender_id"]},
                )
            elif data["type"] == "answer":
                await self.pc.setRemoteDescription(RTCSessionDescription(payload["sdp"], payload["type"]))
            elif data["type"] == "ice_candidate" and payload["candidate"]:
                candidate = candidate_from_sdp(payload["candidate"].removeprefix("candidate:"))
                candidate.sdpMid = payload["sdp_mid"]
                candidate.sdpMLineIndex = payload["sdp_m_line_index"]
                await self.pc.addIceCandidate(candidate)

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pc.close()


async def join(session: ClientSession, server: Any, user: str, room: str = "aio") -> GuideStylePeer:
    ws = await session.ws_connect(f"http://127.0.0.1:{server.port}/webrtc/ws/{room}?token={make_token(user)}")
    config = await (
        await session.get(f"http://127.0.0.1:{server.port}/webrtc/config",
                          headers={"Authorization": f"Bearer {make_token(user)}"})
    ).json()
    assert config["iceServers"] == config["ice_servers"]
    return GuideStylePeer(ws, RTCPeerConnection())


async def test_two_aiortc_peers_exchange_data_both_ways(signal):
    """Guide-shaped offer/answer/candidates through the server; a data channel carries both directions."""
    async with ClientSession() as session:
        alice = await join(session, signal, "alice")
        await asyncio.wait_for(alice.room_state, TIMEOUT)
        bob = await join(session, signal, "bob")
        state = await asyncio.wait_for(bob.room_state, TIMEOUT)
        assert len(state["participants"]) == 2  # the guide's client offers when it sees more than one
        at_alice: asyncio.Queue[str] = asyncio.Queue()
        at_bob: asyncio.Queue[str] = asyncio.Queue()

        @alice.pc.on("datachannel")
        def on_channel(channel: RTCDataChannel) -> None:
            @channel.on("message")
            def on_message(message: str) -> None:
                at_alice.put_nowait(message)
                channel.send(f"echo {message}")

        channel = bob.pc.createDataChannel("chat")
        channel.on("message", at_bob.put_nowait)
        channel.on("open", lambda: channel.send("hello from bob"))
        await bob.offer_to_room()
        assert await asyncio.wait_for(at_alice.get(), WAIT_MS / 1000) == "hello from bob"
        assert await asyncio.wait_for(at_bob.get(), WAIT_MS / 1000) == "echo hello from bob"
        await alice.close()
        await bob.close()


async def test_aiortc_calls_a_chromium_page(signal):
    """aiortc (guide-style) and Chromium (signal-client.js) set up video both ways."""
    async with launch_browser() as browser:
        page = await (await browser.new_context()).new_page()
        origin = f"http://127.0.0.1:{signal.port}"
        await open_and_join(page, f"{origin}/?room=aio&token={make_token('page')}")
        await wait_for(page, "document.body.dataset.status === 'joined'", timeout=WAIT_MS)
        async with ClientSession() as session:
            caller = await join(session, signal, "aio-peer")
            await asyncio.wait_for(caller.room_state, TIMEOUT)
            received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            async def first_frame(track: Any) -> None:
                frame = await track.recv()
                if not received.done():
                    received.set_result(frame)

            frame_tasks: list[asyncio.Task[None]] = []

            @caller.pc.on("track")
            def on_track(track: Any) -> None:
                if track.kind == "video":
                    frame_tasks.append(asyncio.create_task(first_frame(track)))

            caller.pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")
            await caller.offer_to_room()
            await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
            await wait_for(page, frames_above(0), timeout=WAIT_MS)
            frame = await asyncio.wait_for(received, WAIT_MS / 1000)
            assert frame.width > 0
            await caller.close()
