"""Signed webhooks on one node: the event sequence, signatures, retries, drops, bounds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from signal_server.context import SIGNALING
from signal_server.webhooks import WebhookSender, WebhookVerificationError, sign, verify

from .conftest import TIMEOUT, connector, join_all, make_token
from .webhook_receiver import WEBHOOK_SECRET, Receiver, summary

ADMIN = {"Authorization": f"Bearer {make_token('backend', admin=True)}"}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    instance = await Receiver().start()
    yield instance
    await instance.close()


async def hooked(app_client: Any, *urls: str, **overrides: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await app_client(
        webhook_urls=urls, webhook_secret=WEBHOOK_SECRET, **overrides
    )
    return client


class Drops:
    """A node's webhook drops of one reason, counted as they happen (its /metrics shows them
    only when asked, and its log says so at most once a second): wraps the sender's drop."""

    def __init__(self, client: TestClient[Any, Any], reason: str = "retries_exhausted") -> None:
        sender = client.app[SIGNALING].webhooks
        assert sender is not None
        self.count = 0
        self._changed = asyncio.Event()
        drop = sender._drop

        def counting(delivery: Any, why: str) -> None:
            drop(delivery, why)
            if why == reason:
                self.count += 1
                self._changed.set()

        sender._drop = counting

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT * 2):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()


async def metric(client: TestClient[Any, Any], name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------------ verify


def test_verify_accepts_a_genuine_event_and_refuses_everything_else() -> None:
    body = b'{"id":"evt_1","event":"room_started","room_id":"r"}'
    now = int(time.time())
    header = sign(body, WEBHOOK_SECRET, now)
    assert verify(body, header, WEBHOOK_SECRET)["id"] == "evt_1"
    digest = header.partition("v1=")[2]
    assert verify(body, f"t={now},v1={'0' * 64},v1={digest}", WEBHOOK_SECRET)["event"] == "room_started"
    refused = [
        (body + b" ", header),  # the body changed
        (body, sign(body, "another-secret-of-at-least-32-bytes!!", now)),  # another key
        (body, sign(body, WEBHOOK_SECRET, now - 301)),  # stale
        (body, sign(body, WEBHOOK_SECRET, now + 301)),  # from the future
        (body, f"t={now + 1},v1={digest}"),  # the timestamp is signed too
        (body, f"v1={digest}"),
        (body, f"t={now}"),
        (body, ""),
        (body, "t=abc,v1=zz"),
        (b"[1]", sign(b"[1]", WEBHOOK_SECRET, now)),  # not an event object
        (b"nope", sign(b"nope", WEBHOOK_SECRET, now)),
        (body, f"t={now},v1=\u00e9"),  # a non-ASCII signature (a header byte >= 0x80): refused, not TypeError
        (body, f"t={now},v1=\ud800"),  # one that cannot even be encoded
        (body, f"t={now}," + ",".join([f"v1={'0' * 64}"] * 17) + f",v1={digest}"),  # too many to compare
        (body, f"t={now},v1={digest.upper()}"),  # not the lowercase hex the scheme sends
    ]
    for candidate, signature in refused:
        with pytest.raises(WebhookVerificationError):
            verify(candidate, signature, WEBHOOK_SECRET)
    assert verify(body, sign(body, WEBHOOK_SECRET, now - 1000), WEBHOOK_SECRET, tolerance=2000)


# ---------------------------------------------------------------- sequence


async def test_join_resume_kick_and_room_end(app_client: Any, receiver: Receiver) -> None:
    client = await hooked(app_client, receiver.url, reconnect_grace=30)
    connect = connector(client)
    alice = await connect("alice", name="Alice")
    first = await receiver.take(2)
    assert summary(first) == [
        ("room_started", "room-1", None, None), ("participant_joined", "room-1", "alice", None),
    ]
    joined = next(event for event in first if event["event"] == "participant_joined")
    assert joined["participant"] == {"user_id": "alice", "username": "Alice"}
    assert joined["id"].startswith("evt_") and abs(joined["created_at"] - time.time()) < 60
    assert set(joined) == {"id", "event", "created_at", "room_id", "participant"}

    bob = await connect("bob")
    await alice.expect("user_joined")
    assert summary(await receiver.take(1)) == [("participant_joined", "room-1", "bob", None)]
    bob.ws._response.connection.transport.abort()  # type: ignore[union-attr]  # a drop: held, no event
    await connect("bob")  # the resume
    assert summary(await receiver.take(1)) == [("participant_resumed", "room-1", "bob", None)]

    assert (await client.delete("/webrtc/rooms/room-1/participants/bob", headers=ADMIN)).status == 200
    assert summary(await receiver.take(1)) == [("participant_left", "room-1", "bob", "kicked")]
    await alice.ws.close()
    assert summary(await receiver.take(2)) == [
        ("participant_left", "room-1", "alice", "left"), ("room_finished", "room-1", None, None),
    ]
    assert len({event["id"] for event in receiver.events}) == len(receiver.events) == 7
    assert receiver.rejected == 0


async def test_a_closed_room_sends_every_leave_then_the_end(app_client: Any, receiver: Receiver) -> None:
    client = await hooked(app_client, receiver.url)
    await join_all(connector(client), "alice", "bob")
    await receiver.take(3)
    assert (await client.delete("/webrtc/rooms/room-1", headers=ADMIN)).status == 200
    assert summary(await receiver.take(3)) == [
        ("participant_left", "room-1", "alice", "room_closed"), ("participant_left", "room-1", "bob", "room_closed"),
        ("room_finished", "room-1", None, None),
    ]


# ---------------------------------------------------------------- delivery


async def test_non_2xx_answers_are_retried_with_the_same_event(app_client: Any, receiver: Receiver) -> None:
    receiver.fail_first = 2
    client = await hooked(app_client, receiver.url)
    await connector(client)("alice")
    events = await receiver.take(2)
    assert {event["event"] for event in events} == {"room_started", "participant_joined"}
    assert len(receiver.attempts) == 4  # two 500s, retried: the same ids again
    assert set(receiver.attempts) == {event["id"] for event in events}
    assert await metric(client, "signal_webhook_failed_attempts_total") == 2
    assert await metric(client, "signal_webhook_deliveries_total") == 2


async def test_a_down_receiver_drops_after_the_attempts_and_says_so(
    app_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from .cluster import free_port

    url = f"http://127.0.0.1:{free_port()}/hooks?token=do-not-log-me"  # nothing listens there
    caplog.set_level(logging.DEBUG, logger="signal_server.webhooks")
    client = await hooked(app_client, url, webhook_max_attempts=2)
    drops = Drops(client)
    alice = await connector(client)("alice")
    await drops.reach(2)
    assert await metric(client, 'signal_webhook_events_dropped_total{reason="retries_exhausted"}') == 2
    assert await metric(client, "signal_webhook_failed_attempts_total") == 4
    lines = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert 1 <= len(lines) <= 2 and all("retries_exhausted" in line for line in lines)
    text = caplog.text
    assert "do-not-log-me" not in text and WEBHOOK_SECRET not in text and "/hooks" not in text
    await alice.send("ping")
    await alice.expect("pong")


async def test_a_hanging_receiver_times_out_and_signaling_goes_on(app_client: Any, receiver: Receiver) -> None:
    receiver.mode = "hang"
    client = await hooked(app_client, receiver.url, webhook_timeout=0.3, webhook_max_attempts=2)
    drops = Drops(client)
    alice, bob = await join_all(connector(client), "alice", "bob")
    for _ in range(20):  # relaying is untouched by the stuck deliveries
        await alice.offer("v=0")
        assert (await bob.expect("offer"))["sender_id"] == "alice"

    await drops.reach(3)
    assert await metric(client, 'signal_webhook_events_dropped_total{reason="retries_exhausted"}') == 3
    assert len(receiver.attempts) == 6  # 3 events, 2 attempts each, each cut at 0.3 s


async def test_a_hanging_receiver_fills_only_its_own_queue(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Two receivers (a backend and an audit sink, say); one hangs. Its backlog hits the
    bound and its events are dropped; the healthy one still gets every event."""
    hung = await Receiver().start()
    hung.mode = "hang"
    sender = WebhookSender((hung.url, receiver.url), WEBHOOK_SECRET, timeout=30, max_queue=4)
    await sender.start()
    try:
        for number in range(12):  # paced by the healthy receiver: it alone keeps up
            sender.hub_event("participant_joined", "room-1", f"user-{number}")
            await receiver.take(1)
        assert len(receiver.events) == 12
        assert sender.dropped["queue_full"] == 12 - 4 - 1  # the hung one's: one in flight, four queued
        lines = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
        assert 1 <= len(lines) < 7 and "queue_full" in lines[0], lines  # not a line per event
    finally:
        await sender.stop()
        await hung.close()


async def test_redirects_are_never_followed(app_client: Any, receiver: Receiver) -> None:
    target = await Receiver().start()
    try:
        receiver.mode = "redirect"
        receiver.redirect_to = target.url
        client = await hooked(app_client, receiver.url, webhook_max_attempts=1)
        drops = Drops(client)
        await connector(client)("alice")
        await drops.reach(2)
        assert await metric(client, 'signal_webhook_events_dropped_total{reason="retries_exhausted"}') == 2
        assert target.attempts == [] and target.rejected == 0
    finally:
        await target.close()


async def test_the_queue_is_bounded(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.mode = "hang"
    sender = WebhookSender((receiver.url,), WEBHOOK_SECRET, timeout=TIMEOUT * 4, max_queue=5)
    await sender.start()
    try:
        for index in range(50):  # more than the workers take plus the queue holds
            sender.hub_event("participant_joined", "room-1", f"user-{index}", None, None)
        assert sender.dropped["queue_full"] >= 50 - 5 - 1
        assert "queue_full" in caplog.text
        await receiver.wait_attempts(1)  # the receiver's one worker is stuck on it
    finally:
        await sender.stop()


def test_webhook_settings_are_checked() -> None:
    from signal_server.settings import SettingsError, load_settings

    for flags, message in (
        ({"webhook-url": ["ftp://example.com/x"]}, "http"),
        ({"webhook-url": ["https://user:pw@example.com/x"]}, "user:password"),
        ({"webhook-url": ["http:///nohost"]}, "host"),
        ({"webhook-url": ["https://example.com/x"]}, "--webhook-secret"),
        ({"webhook-url": ["https://example.com/x"], "webhook-secret": "short"}, "32 bytes"),
    ):
        with pytest.raises(SettingsError, match=message):
            load_settings(flags, {})
    settings = load_settings(
        {"webhook-url": ["https://a.example/x", "http://127.0.0.1:9/y"], "webhook-secret": WEBHOOK_SECRET}, {}
    )
    assert settings.webhook_urls == ("https://a.example/x", "http://127.0.0.1:9/y")


async def test_no_webhooks_no_sender(client: TestClient[Any, Any]) -> None:
    from signal_server.context import SIGNALING

    assert client.app[SIGNALING].webhooks is None
    assert client.app[SIGNALING].hub.on_event is None
