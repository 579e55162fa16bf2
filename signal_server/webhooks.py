"""Signed webhooks: the app's backend learns who comes and goes (docs/protocol.md).

Events (``room_started``, ``room_finished``, ``participant_joined``,
``participant_left``, ``participant_resumed``) are POSTed as JSON to every
``--webhook-url``, signed with ``--webhook-secret``:

    Signal-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

:func:`verify` is the receiver's side. Delivery never slows signaling: the hub
only appends to a bounded queue (``put_nowait``); one worker task per
receiver POSTs them in order (a slow receiver delays only its own events),
each attempt under a time limit, never following a redirect, and a failure or
a non-2xx answer is retried later with exponential backoff and jitter. An
event dropped (queue full, or every attempt failed) is counted
(``signal_webhook_events_dropped``) and logged with its id and the receiver's
origin only: never the secret, a token, or the URL's path and query.

In a cluster the Lua scripts decide the events (atomically with the change
they describe, ids included) and push them on one Redis list; every node with
webhooks takes batches from it into its own in-flight list in Redis and
finishes each event there once every receiver answered it or it was given up,
so an event is sent by one node, and again by another if that node died first
(cluster/events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from yarl import URL

__all__ = [
    "verify", "sign", "WebhookVerificationError", "WebhookSender", "EventSource", "SIGNATURE_HEADER", "EVENT_TYPES",
]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Signal-Signature"
EVENT_TYPES = frozenset(
    {"room_started", "room_finished", "participant_joined", "participant_left", "participant_resumed"}
)
BACKOFF_BASE = 0.5  # seconds before the first retry; doubled each time, times 0.5-1.0
BACKOFF_CAP = 60.0
_DROP_LOG_EVERY = 1.0  # seconds between log lines about dropped events (per receiver and reason)
_DRAIN_BATCH = 100
_DRAIN_IDLE = 0.2  # seconds between polls of an empty Redis list
_IN_FLIGHT = 1000  # cluster events one node holds at most (taken, not yet finished)


class EventSource(Protocol):
    """Where a cluster's events wait (cluster/events.py): taken in order, finished when done."""

    async def take(self, limit: int) -> tuple[list[bytes], int, int]: ...

    async def finish(self, events: list[bytes]) -> None: ...


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_SIGNATURES = 16


class WebhookVerificationError(ValueError):
    """The request is not a genuine, fresh webhook of this server."""


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Signal-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(body: bytes, signature_header: str, secret: str, tolerance: float = 300) -> dict[str, Any]:
    """Check a webhook's signature and freshness; return the parsed event.

    ``body`` is the raw request body (before any JSON parsing), ``signature_header``
    the ``Signal-Signature`` header. A timestamp more than ``tolerance`` seconds
    from now is refused (a replayed request). Deduplicate on the event's ``id``:
    delivery is at least once.

    Raises:
        WebhookVerificationError: missing or malformed header, stale timestamp,
        wrong signature, or a body that is not a JSON object.
    """
    timestamp: int | None = None
    signatures: list[str] = []
    for part in (signature_header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and _HEX_DIGEST.fullmatch(value):
            signatures.append(value)  # anything else (non-ASCII included) is no signature of ours
    if timestamp is None or not signatures:
        raise WebhookVerificationError("the signature header needs t=<seconds> and v1=<64 hex digits>")
    if len(signatures) > _MAX_SIGNATURES:  # two during a secret rotation; this many is an attack
        raise WebhookVerificationError(f"more than {_MAX_SIGNATURES} v1 signatures")
    if abs(time.time() - timestamp) > tolerance:
        raise WebhookVerificationError("the timestamp is outside the tolerance (a replayed or delayed request)")
    expected = sign(body, secret, timestamp).partition(",v1=")[2]
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise WebhookVerificationError("the signature does not match")
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return event


def _origin(url: str) -> str:
    """What a log line may say of a receiver: scheme, host and port (a path or query may hold a token)."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


@dataclass(slots=True, eq=False)
class _Delivery:
    url: str
    body: bytes
    event_id: str
    kind: str
    attempt: int = 1
    source: bytes | None = None  # the cluster event it came from, finished once every receiver is done


class WebhookSender:
    """One node's webhook deliveries: bounded queues, one worker per receiver, retries."""

    def __init__(
        self, urls: tuple[str, ...], secret: str, *, timeout: float = 5.0, max_attempts: int = 8,
        max_queue: int = 10_000, backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.urls = urls
        self._secret = secret
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_queue = max_queue
        self._backoff_base = backoff_base
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {url: asyncio.Queue() for url in urls}
        # Per receiver, deliveries waiting for their next attempt.
        self._retrying: dict[str, dict[_Delivery, asyncio.TimerHandle]] = {url: {} for url in urls}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.failed_attempts = 0
        self.dropped: Counter[str] = Counter()
        self._drop_log: dict[tuple[str, str], tuple[float, int]] = {}  # last line, drops not logged since
        # Cluster events taken from Redis: deliveries still open for each, then
        # the ones done, waiting to be finished in Redis.
        self._open: dict[bytes, int] = {}
        self._done: list[bytes] = []
        self._done_ready = asyncio.Event()
        self._source: EventSource | None = None
        self.cluster_dropped: int | None = None  # sig:wh:dropped, read with every take
        self.cluster_queued: int | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self, source: EventSource | None = None) -> None:
        """Start the workers; with ``source`` (a cluster) also take events from the cluster's list."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": "signal-server-webhooks"},
        )
        loop = asyncio.get_running_loop()
        logger.info(
            "webhooks: delivering to %s%s", ", ".join(_origin(url) for url in self.urls),
            " (events from the cluster's registry)" if source is not None else "",
        )
        self._tasks = [loop.create_task(self._work(queue)) for queue in self._queues.values()]
        self._source = source
        if source is not None:
            self._tasks.append(loop.create_task(self._drain(source)))
            self._tasks.append(loop.create_task(self._finish_loop(source)))

    async def stop(self) -> None:
        """Stop delivering. Cluster events not finished stay in this node's in-flight
        list, which the cluster gives back to the queue when the node deregisters."""
        for retrying in self._retrying.values():
            for handle in retrying.values():
                handle.cancel()
            retrying.clear()
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded, like every step of the shutdown
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        if self._source is not None and self._done:
            with contextlib.suppress(Exception):  # redis-py's errors: then they are sent again
                await asyncio.wait_for(self._source.finish(self._done), 2.0)
        if self._session is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session.close(), 2.0)

    # --------------------------------------------------------------- events

    def hub_event(
        self, kind: str, room_id: str, user_id: str | None = None, username: str | None = None,
        reason: str | None = None, at: float | None = None,
    ) -> None:
        """Queue one event for every receiver; never blocks, never raises."""
        self._queue_event(kind, room_id, user_id, username, reason, at, "evt_" + secrets.token_hex(12))

    def _queue_event(
        self, kind: str, room_id: str, user_id: str | None, username: str | None, reason: str | None,
        at: float | None, event_id: str, source: bytes | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "id": event_id,
            "event": kind,
            "created_at": round(time.time() if at is None else at, 6),
            "room_id": room_id,
        }
        if user_id is not None:
            participant: dict[str, Any] = {"user_id": user_id, "username": username or user_id}
            if reason is not None:
                participant["reason"] = reason
            event["participant"] = participant
        body = orjson.dumps(event)
        if source is not None:
            self._open[source] = len(self.urls)
        for url in self.urls:
            self._put(_Delivery(url, body, event_id, kind, source=source))

    @property
    def waiting(self) -> int:
        """Deliveries queued or between attempts, for every receiver."""
        return sum(self._waiting_for(url) for url in self.urls)

    def _waiting_for(self, url: str) -> int:
        """One receiver's backlog, bounded by ``max_queue``: a receiver that hangs or
        is down fills its own, never another's."""
        return self._queues[url].qsize() + len(self._retrying[url])

    def _put(self, delivery: _Delivery) -> None:
        if self._waiting_for(delivery.url) >= self._max_queue:
            self._drop(delivery, "queue_full")
            return
        self._queues[delivery.url].put_nowait(delivery)

    def _drop(self, delivery: _Delivery, reason: str) -> None:
        """Count it; log it, at most one line a second per receiver and reason (a dead
        receiver under churn would otherwise write a line per event)."""
        self.dropped[reason] += 1
        self._delivered(delivery)  # given up: finished all the same
        key = (delivery.url, reason)
        now = time.monotonic()
        last, unlogged = self._drop_log.get(key, (-_DROP_LOG_EVERY, 0))
        if now - last < _DROP_LOG_EVERY:
            self._drop_log[key] = (last, unlogged + 1)
            return
        self._drop_log[key] = (now, 0)
        logger.warning(
            "webhook %s %s to %s dropped (%s, after %d attempts)%s", delivery.kind, delivery.event_id,
            _origin(delivery.url), reason, delivery.attempt - (reason == "queue_full"),
            f"; {unlogged} more dropped since the last line" if unlogged else "",
            extra={"event_id": delivery.event_id, "reason": reason},
        )

    def _delivered(self, delivery: _Delivery) -> None:
        """One receiver is done with it (answered, or given up): the cluster event is
        finished in Redis once every receiver is."""
        source = delivery.source
        if source is None:
            return
        left = self._open.get(source, 1) - 1
        if left > 0:
            self._open[source] = left
            return
        self._open.pop(source, None)
        self._done.append(source)
        self._done_ready.set()

    # ------------------------------------------------------------- delivery

    async def _work(self, queue: asyncio.Queue[_Delivery]) -> None:
        while True:
            delivery = await queue.get()
            if await self._attempt(delivery):
                self.sent += 1
                self._delivered(delivery)
                continue
            self.failed_attempts += 1
            if delivery.attempt >= self._max_attempts:
                self._drop(delivery, "retries_exhausted")
                continue
            delay = min(BACKOFF_CAP, self._backoff_base * 2 ** (delivery.attempt - 1)) * random.uniform(0.5, 1.0)
            delivery.attempt += 1
            self._retrying[delivery.url][delivery] = asyncio.get_running_loop().call_later(
                delay, self._again, delivery
            )

    def _again(self, delivery: _Delivery) -> None:
        del self._retrying[delivery.url][delivery]
        self._queues[delivery.url].put_nowait(delivery)  # counted against the bound all along

    async def _attempt(self, delivery: _Delivery) -> bool:
        """One POST under the per-attempt time limit; True on a 2xx answer."""
        assert self._session is not None
        timestamp = int(time.time())  # signed per attempt: a retry is never stale
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(delivery.body, self._secret, timestamp),
            "Signal-Event-Id": delivery.event_id,
        }
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.post(
                    delivery.url, data=delivery.body, headers=headers, allow_redirects=False
                ) as response:
                    ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            logger.debug("webhook %s to %s failed: %s", delivery.event_id, _origin(delivery.url), type(exc).__name__)
            return False
        if not ok:
            logger.debug("webhook %s to %s: HTTP %d", delivery.event_id, _origin(delivery.url), response.status)
        return ok

    # -------------------------------------------------------------- cluster

    async def _drain(self, source: EventSource) -> None:
        """Take the cluster's events from Redis, in order, while this node holds
        fewer than ``_IN_FLIGHT`` (each event is taken by one node only)."""
        while True:
            room = _IN_FLIGHT - len(self._open) - len(self._done)
            try:
                items, self.cluster_dropped, self.cluster_queued = await source.take(min(_DRAIN_BATCH, room))
            except Exception as exc:  # redis-py's errors; this module never imports redis
                logger.debug("webhooks: cannot read the cluster's events: %s", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            if not items:
                await asyncio.sleep(_DRAIN_IDLE)
                continue
            for raw in items:
                if raw in self._open:  # given back while this node still had it (found dead wrongly)
                    self._done.append(raw)  # the second copy on the in-flight list
                    self._done_ready.set()
                    continue
                try:
                    item = orjson.loads(raw)
                    at = int(item["us"]) / 1e6 if "us" in item else item["t"] / 1000
                    event_id = str(item.get("id") or "evt_" + secrets.token_hex(12))  # pushed by an older node
                    self._queue_event(
                        item["e"], item["r"], item.get("u"), item.get("n"), item.get("why"), at, event_id, raw
                    )
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    logger.warning("webhooks: a malformed event in Redis was skipped")
                    self._done.append(raw)
                    self._done_ready.set()

    async def _finish_loop(self, source: EventSource) -> None:
        """Finish done events in Redis, in batches; on an error, again a second later."""
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            while self._done:
                batch = self._done[:]
                try:
                    await source.finish(batch)
                except Exception as exc:  # redis-py's errors
                    logger.debug("webhooks: cannot finish events in Redis: %s", type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                del self._done[:len(batch)]

    # -------------------------------------------------------------- metrics

    def collector(self) -> Collector:
        return _WebhookCollector(self)


class _WebhookCollector(Collector):
    """signal_webhook_deliveries, signal_webhook_failed_attempts, signal_webhook_events_dropped, the queue."""

    def __init__(self, sender: WebhookSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        sender = self._sender
        yield CounterMetricFamily("signal_webhook_deliveries", "Webhook deliveries answered 2xx", value=sender.sent)
        yield CounterMetricFamily(
            "signal_webhook_failed_attempts", "Webhook attempts that failed or were not 2xx (retried)",
            value=sender.failed_attempts,
        )
        dropped = CounterMetricFamily(
            "signal_webhook_events_dropped", "Webhook deliveries given up, by reason", labels=["reason"]
        )
        for reason in ("queue_full", "retries_exhausted"):
            dropped.add_metric([reason], sender.dropped[reason])
        yield dropped
        yield GaugeMetricFamily(
            "signal_webhook_queue", "Webhook deliveries waiting (queued or between retries)",
            value=sender.waiting,
        )
        if sender.cluster_dropped is not None:  # as read with the last take from Redis
            yield CounterMetricFamily(
                "signal_webhook_cluster_events_dropped",
                "Cluster webhook events not queued because the Redis queue was full (cluster-wide)",
                value=sender.cluster_dropped,
            )
        if sender.cluster_queued is not None:
            yield GaugeMetricFamily(
                "signal_webhook_cluster_queue", "Cluster webhook events waiting in Redis (cluster-wide)",
                value=sender.cluster_queued,
            )
