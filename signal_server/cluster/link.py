"""The node's connections to Redis: one ordered command stream, one subscriber.

Every command this node sends (publishes, scripts, heartbeats) goes through
one FIFO queue drained by one writer task into pipelines. One queue means one
order: a slot's hold is applied before the frames kept for it, and two
messages from one sender to one node are published in the order sent.
``publish`` and ``keep`` only append to the queue, so the relay path never
awaits Redis; ``call`` awaits its own reply.

The writer holds one connection of redis-py's (the client's own class and
settings, sentinel-managed included) and writes each batch on it with one
``send_packed_command``, then reads the replies in order. Not a redis-py
``Pipeline`` per batch: at a low rate every message is its own batch, and the
pipeline's machinery (a pool checkout with its lock and checks, a task for the
timed write, a timer per reply, retry and observability wrappers) cost the
sending node about 3.5 times the instructions of the whole relay on one node. The
connection has no socket timeout; the liveness check drops it instead when a
batch stays unanswered for ``COMMAND_TIMEOUT`` (no timer per batch).

The subscriber listens on this node's channel. The link comes ``up`` when a
ping published to our own channel comes back through it. It goes down when
Redis stops answering: a command was written and no reply from Redis (to any
command, or a ping back) has been read for ``PING_WINDOW``, at ``STRIKES``
checks in a row, so the loop had turns to read a reply that was waiting; or
when Redis says nobody listens on our channel. A node that is merely behind
(its loop stalled or saturated, a long queue of its own commands, a backlog
on its subscriber) keeps seeing replies and stays up. When the link breaks,
both tasks back off (capped, jittered) and retry; the owner is told of every
up/down change so it can log one line and re-register its slots, and of
every (re)subscription, since what was published to the channel meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..errors import StartupError
from ..settings import Settings
from . import scripts

__all__ = ["RedisLink", "Backoff", "channel_of", "client_name", "LinkDown"]

logger = logging.getLogger("signal_server.cluster")

TICK = 0.5  # seconds between readiness pings and reaper runs
PING_WINDOW = 1.0  # down when a written command, and Redis, stayed silent this long
CHECK_EVERY = 0.1  # seconds between liveness checks
STRIKES = 3  # consecutive checks that must find Redis overdue (the loop read what it could in between)
COMMAND_TIMEOUT = 5.0  # a batch unanswered this long: its connection is dropped (the client's socket timeout)
MAX_BATCH = 1000  # commands per pipeline: each reply comes back soon even with a long queue
MAX_QUEUE = 10_000  # queued commands while Redis is slow; beyond, frames are lost
NAMES = (
    "JOIN", "LEAVE", "HOLD", "KEEP", "REAP", "NODE_UP", "NODE_DOWN", "RELEASE_NODES", "RESTORE",
    "KICK", "CLOSE", "SEND", "HANDED", "MEMBERS",
)


def channel_of(node: str) -> str:
    return "sig:ch:" + node


def client_name(node: str) -> str:
    """The name of a node's connections in CLIENT LIST (tells a killed node from a cut-off one)."""
    return "signal-" + node


class LinkDown(Exception):
    """Redis is unreachable, or too slow for the queue: the caller reports UNAVAILABLE."""


class Backoff:
    """Capped exponential backoff with jitter: 0.1 s doubling to ``cap``, times 0.5-1.0."""

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay: float = min(self.cap, self.base * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(eq=False)
class _Command:
    args: tuple[Any, ...]
    future: asyncio.Future[Any] | None = None
    on_result: Callable[[Any], None] | None = None
    script: str | None = None
    retried: bool = False  # sent again once after NOSCRIPT


# In the queue: commands after it wait for the replies of those before it (and
# for the fallbacks those replies ask for, see send_script_next).
_BARRIER = _Command(())

SCRIPT_SOURCES = {name: scripts.PRELUDE + getattr(scripts, name) for name in NAMES}
SCRIPT_SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPT_SOURCES.items()}


def _checked_checkout() -> dict[str, Any]:
    """Options that keep the pool's check of a connection it hands out.

    The pool reconnects, before use, a pooled connection whose server closed it
    (a restarted Redis, its ``timeout``, CLIENT KILL), and only then does the
    command go out: the retry on a fresh connection that is safe for every command,
    since nothing was sent yet. redis-py 8.1's asyncio pool skips that check while
    maintenance notifications are on, and it turns them on by itself ("auto") for
    RESP3 over TCP (redis-py issue 4252): a connection left idle in the pool across
    an empty restart went out as it was and failed with "Connection closed by
    server" (a subscription, so the link went down; the webhook sender's read; an
    admin read, 503). Those notifications come from managed Redis services, never
    from redis-server, which refuses CLIENT MAINT_NOTIFICATIONS; without them each
    connect saves that command too. Older redis-py has neither.
    """
    if "maint_notifications_config" not in inspect.signature(ConnectionPool.__init__).parameters:
        return {}
    from redis.maint_notifications import MaintNotificationsConfig

    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


_CHECKED_CHECKOUT = _checked_checkout()


def make_client(settings: Settings, node: str) -> Redis:
    """A client for the URL, or for the master the sentinels name (followed across failovers)."""
    options: dict[str, Any] = {
        "client_name": client_name(node),
        # Failures surface at once; this module retries with its own backoff.
        "retry": Retry(NoBackoff(), 0),
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 0,
        **_CHECKED_CHECKOUT,
    }
    if settings.redis_sentinels:
        hosts = []
        for spec in settings.redis_sentinels:
            host, _, port = spec.rpartition(":")
            hosts.append((host.strip("[]"), int(port)))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, socket_timeout=1.0, sentinel_kwargs={"socket_timeout": 1.0})
        master: Redis = sentinel.master_for(settings.redis_master or "", **options)
        return master
    assert settings.redis_url is not None
    client: Redis = Redis.from_url(settings.redis_url, **options)
    return client


def stream_connection(client: Redis) -> AbstractConnection:
    """A connection like the client's pool makes (same class, so a sentinel-managed one
    follows failovers; same name, so CLIENT LIST shows it as this node's), held by
    the command writer outside the pool and without a socket timeout: a write is not a
    task and a reply read not a timer (see COMMAND_TIMEOUT)."""
    pool = client.connection_pool
    connection: AbstractConnection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
    return connection


class RedisLink:
    """Owns the Redis client, the command queue, the subscriber and the ticker."""

    def __init__(
        self,
        settings: Settings,
        node: str,
        on_message: Callable[[bytes], None],
        on_state: Callable[[bool], None],
        on_registered: Callable[[], None],
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.boot = secrets.token_hex(8)  # this process: tells a restarted or twin node from us
        self.channel = channel_of(node)
        self.redis = make_client(settings, node)
        self._stream = stream_connection(self.redis)
        self.up = False
        self.nodes_seen = 0
        self._on_message = on_message
        self._on_state = on_state
        self._on_registered = on_registered
        self._on_subscribed = on_subscribed
        self._queue: list[_Command] = []
        self._next: list[_Command] = []
        self._barriers = 0  # _BARRIER entries in the queue
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_answer = 0.0  # when a reply from Redis was last read (either connection)
        self._writing_since: float | None = None  # a pipeline written and not answered yet
        self._strikes = 0
        self._pubsub: PubSub | None = None
        self._closing = False
        self._scripts_loaded = False
        self._ttl_ms = int(settings.node_ttl * 1000)
        self._grace_ms = int(settings.reconnect_grace * 1000)
        # A node that delivers webhooks keeps the scripts' switch on with every
        # registration and refresh (three refreshes long, at least 30 s).
        switch_ms = max(30_000, 3 * self._ttl_ms) if settings.webhook_urls else 0
        self._node_up = (node, self.boot, self._ttl_ms, switch_ms)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Register this node (refusing an id another live node holds), then run.

        Raises:
            StartupError: the node id is in use by another live process.
        """
        try:
            replies = await asyncio.wait_for(
                self._exchange([*self._script_loads(), ("EVALSHA", SCRIPT_SHAS["NODE_UP"], 0, *self._node_up)]),
                COMMAND_TIMEOUT,
            )
            result = replies[-1]
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            self._scripts_loaded = True
        except (RedisError, OSError, TimeoutError) as exc:
            await self._drop_stream()  # a reply may still be on its way
            # Start anyway, not ready: the tasks below keep trying with backoff.
            logger.warning("cluster: Redis unreachable at start-up (%s); retrying", exc)
            result = 2
        if int(result) == 0:
            raise StartupError(
                f"--node-id: {self.node!r} is in use by another live node; "
                f"pick another id or wait {self.settings.node_ttl:g} s for its key to expire"
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_loop()),
            loop.create_task(self._subscribe_loop()),
            loop.create_task(self._tick_loop()),
            loop.create_task(self._watch_loop()),
        ]

    async def stop(self) -> None:
        """Stop the tasks, deregister (slots stay held in Redis), close the client.

        Frames that reach this node until it stops listening are queued for Redis
        (kept for its held slots): listening stops first, then the queue is flushed,
        so none is left unsent while a resume elsewhere would say recovered.
        """
        await self.flush()
        await self._stop_listening()
        await self.flush()
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a client call may not honour the cancel
            await asyncio.wait(self._tasks, timeout=2.0)
        try:
            await asyncio.wait_for(
                self.redis.evalsha(SCRIPT_SHAS["NODE_DOWN"], 0, self.node, self.boot), 2.0
            )
        except (RedisError, OSError, TimeoutError):
            pass
        try:
            await asyncio.wait_for(self._stream.disconnect(), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass
        try:
            await asyncio.wait_for(self.redis.aclose(), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass

    async def _stop_listening(self) -> None:
        """UNSUBSCRIBE, and let the subscriber hand on every message Redis sent before
        confirming it (bounded); later publishes find no receiver and are kept by
        their senders."""
        if not self._tasks:
            return
        subscriber = self._tasks[1]
        self._closing = True
        try:
            if self._pubsub is not None and self.up:
                await asyncio.wait_for(self._pubsub.unsubscribe(self.channel), 1.0)
                await asyncio.wait_for(asyncio.shield(subscriber), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass
        subscriber.cancel()
        await asyncio.wait([subscriber], timeout=2.0)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until every command queued so far has been sent (bounded)."""
        if not self._tasks or not self.up:
            return
        try:
            await asyncio.wait_for(self.call("NODE_UP", *self._node_up), timeout)
        except (LinkDown, TimeoutError, RedisError):
            pass

    # ------------------------------------------------------------ commands

    def publish(self, node: str, data: bytes, on_result: Callable[[Any], None] | None = None) -> bool:
        """Queue a publish to ``node``'s channel; False when the queue is full."""
        return self._enqueue(_Command(("PUBLISH", channel_of(node), data), on_result=on_result))

    def send_script(self, name: str, *args: Any, on_result: Callable[[Any], None] | None = None) -> bool:
        """Queue a script without waiting for it."""
        return self._enqueue(_Command(args, on_result=on_result, script=name))

    def send_script_next(self, name: str, *args: Any) -> None:
        """From a result callback: run the script before anything queued after that
        command (a publish's fallback belongs to the publish's place in the order)."""
        self._next.append(_Command(args, script=name))

    async def call(self, name: str, *args: Any) -> Any:
        """Run a script in queue order and return its reply.

        Raises:
            LinkDown: Redis is unreachable or too slow.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._enqueue(_Command(args, future=future, script=name)):
            raise LinkDown("the Redis queue is full")
        return await future

    def barrier(self) -> None:
        """Send what is queued from now on only after the replies to what is queued
        before, and the fallbacks they ask for: a message published to a node that
        nobody listens on any more is forwarded (KEEP) before a later one goes
        directly to where its recipient moved."""
        if self._queue and self._queue[-1] is not _BARRIER:
            self._queue.append(_BARRIER)
            self._barriers += 1

    def _take_batch(self) -> list[_Command]:
        """The next pipeline: up to MAX_BATCH commands, never across a barrier."""
        end = MAX_BATCH
        if self._barriers:
            try:
                end = self._queue.index(_BARRIER, 0, MAX_BATCH)
            except ValueError:
                pass
        batch, self._queue = self._queue[:end], self._queue[end:]
        if not batch and self._queue:  # the barrier itself: what was before it is answered
            del self._queue[0]
            self._barriers -= 1
        return batch

    def _enqueue(self, command: _Command) -> bool:
        if len(self._queue) >= MAX_QUEUE:
            return False
        self._queue.append(command)
        self._wake.set()
        return True

    @staticmethod
    def _script_loads() -> list[tuple[Any, ...]]:
        return [("SCRIPT", "LOAD", source) for source in SCRIPT_SOURCES.values()]

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` on the held connection in one go (connecting first if it is
        not), then read their replies in order; an error reply is its exception object."""
        stream = self._stream
        if not stream.is_connected:
            await stream.connect()  # type: ignore[no-untyped-call]  # as the pool does (sentinel: asks for the master)
        await stream.send_packed_command(stream.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await stream.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def _write_loop(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    self._writing_since = time.monotonic()
                    commands, groups = _pipeline(batch)
                    if self._scripts_loaded:
                        results = await self._exchange(commands)
                    else:  # in the same write: loaded before anything of the batch runs
                        loads = self._script_loads()
                        results = (await self._exchange(loads + commands))[len(loads):]
                        self._scripts_loaded = True
                    self._answered()
                except Exception as exc:  # RedisError, OSError, or a client-library surprise
                    self._writing_since = None
                    if not isinstance(exc, (RedisError, OSError)):
                        logger.exception("cluster: a write to Redis failed unexpectedly")
                    # Replies may still be on their way: never read them as another batch's.
                    await self._drop_stream()
                    self._scripts_loaded = False
                    self._link_failed(exc)
                    for command in batch:
                        _settle(command, LinkDown(str(exc)))
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                again: list[_Command] = []
                for group, result in zip(groups, results, strict=True):
                    if isinstance(result, NoScriptError) and not group[0].retried:
                        # Redis lost the scripts (restarted between two writes, failed
                        # over to a replica, SCRIPT FLUSH): load them, run these again.
                        self._scripts_loaded = False
                        group[0].retried = True
                        again.append(group[0])
                        continue
                    for command in group:
                        _settle(command, result)
                if self._next or again:
                    self._queue[:0] = again + self._next
                    self._next = []

    # ---------------------------------------------------------- subscriber

    async def _subscribe_loop(self) -> None:
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub()
            self._pubsub = pubsub
            try:
                await pubsub.subscribe(self.channel)
                backoff.reset()
                self._on_subscribed()
                read = pubsub.parse_response
                while True:
                    # Blocking read of raw replies: no per-message timeout context or
                    # dict (a dead connection still raises); liveness is the ping.
                    reply = await read(block=True)
                    if not reply or reply[0] != b"message":
                        if reply and reply[0] == b"unsubscribe" and self._closing:
                            return  # stopping: everything sent before this was handed on
                        continue
                    for data in unpack_messages(reply[2]):
                        self._dispatch(data)
            except (RedisError, OSError) as exc:
                self._link_failed(exc)
            except Exception as exc:
                # Anything else from the client library must not end the
                # subscriber for good (the node would never be ready again).
                logger.exception("cluster: the subscriber failed; reconnecting")
                self._link_failed(exc)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]
                except (RedisError, OSError, TimeoutError):
                    pass
            await asyncio.sleep(backoff.next())

    def _dispatch(self, data: bytes) -> None:
        if data[:1] == b"p":
            if data[1:] == self.boot.encode():
                self._last_answer = time.monotonic()
                self._set_up(True)
            return
        try:
            self._on_message(data)
        except Exception:  # a bad message must not stop the subscriber
            logger.exception("cluster: could not handle a message from Redis")

    # --------------------------------------------------------------- ticker

    async def _tick_loop(self) -> None:
        """Every tick: ping through pub/sub, refresh the node key, reap, find dead nodes."""
        refresh_every = max(TICK, self.settings.node_ttl / 3)
        last_refresh = 0.0
        backoff = Backoff()
        while True:
            now = time.monotonic()
            try:
                self.publish(self.node, b"p" + self.boot.encode(), self._ping_result)
                if now - last_refresh >= refresh_every or not self.up:
                    registered = await self.call("NODE_UP", *self._node_up)
                    last_refresh = now
                    if int(registered) == 2:
                        self._on_registered()
                    elif int(registered) == 0:
                        logger.error("cluster: node id %r is now held by another process", self.node)
                released = await self.call("RELEASE_NODES", self._grace_ms)
                if isinstance(released, list):
                    self.nodes_seen = int(released[0])
                    for node in released[1:]:
                        logger.warning("cluster: node %s is gone; its participants are held", _text(node))
                await self.call("REAP")
                backoff.reset()
                await asyncio.sleep(TICK)
            except (LinkDown, RedisError, OSError) as exc:
                self._link_failed(exc)
                await asyncio.sleep(backoff.next())
            except Exception as exc:  # a surprise must not stop the node's heartbeat for good
                logger.exception("cluster: the tick failed")
                self._link_failed(exc)
                await asyncio.sleep(backoff.next())

    async def _watch_loop(self) -> None:
        """Down once Redis is overdue at STRIKES checks in a row, even while a command hangs;
        the writer's connection dropped once a batch is unanswered for COMMAND_TIMEOUT."""
        while True:
            await asyncio.sleep(CHECK_EVERY)
            self.check()
            since = self._writing_since
            if since is not None and time.monotonic() - since > COMMAND_TIMEOUT and self._stream.is_connected:
                # The writer's read fails (the connection is closed) and it backs off as after any error.
                logger.warning("cluster: Redis left a write unanswered for %g s; reconnecting", COMMAND_TIMEOUT)
                await self._drop_stream()

    async def _drop_stream(self) -> None:
        try:
            await self._stream.disconnect(nowait=True)
        except (RedisError, OSError):
            pass

    def check(self) -> None:
        """One liveness check. Overdue: a pipeline was written PING_WINDOW ago and is
        unanswered, and nothing else from Redis was read meanwhile. One overdue check is not
        enough: after a stall of this node's loop the reply may be waiting
        unread, so the next checks (each on a later turn of the loop) must agree."""
        now = time.monotonic()
        overdue = self._writing_since is not None and now - max(self._last_answer, self._writing_since) > PING_WINDOW
        self._strikes = self._strikes + 1 if overdue else 0
        if self.up and self._strikes >= STRIKES:
            self._set_up(False)

    def _answered(self) -> None:
        self._last_answer = time.monotonic()
        self._writing_since = None

    def _ping_result(self, receivers: Any) -> None:
        """Redis answered our ping: 0 receivers means it has no subscription of
        ours, whatever our subscriber believes: down, and subscribe again."""
        if receivers != 0 or self._closing or not self.up:
            return
        logger.warning("cluster: Redis lost this node's subscription; subscribing again")
        self._set_up(False)
        self._tasks[1].cancel()
        self._tasks[1] = asyncio.get_running_loop().create_task(self._subscribe_loop())

    # ---------------------------------------------------------------- state

    def _link_failed(self, exc: BaseException) -> None:
        if self.up:
            logger.debug("cluster: Redis error: %s", exc)
        self._set_up(False)

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            logger.info("cluster: Redis reachable (node %s)", self.node)
        else:
            logger.warning("cluster: Redis unreachable; cross-node relay and joins paused (node %s)", self.node)
        self._on_state(up)


def _pipeline(batch: list[_Command]) -> tuple[list[tuple[Any, ...]], list[list[_Command]]]:
    """The Redis commands for ``batch``, and the queued commands behind each one's reply.

    A run of publishes with no script between them becomes one publish per
    channel (a container of the messages, in order): under load a node sends
    one message to each other node per loop turn instead of one per frame.
    Only channels are regrouped, never a publish across a script, so every
    order that matters (one channel's messages; a script before or after a
    publish) stays as queued.
    """
    wire: list[tuple[Any, ...]] = []
    groups: list[list[_Command]] = []
    run: dict[str, list[_Command]] = {}

    def flush() -> None:
        for channel, commands in run.items():
            if len(commands) == 1:
                wire.append(commands[0].args)
            else:
                wire.append(("PUBLISH", channel, pack_messages([c.args[2] for c in commands])))
            groups.append(commands)
        run.clear()

    for command in batch:
        if command.script is None:
            run.setdefault(command.args[1], []).append(command)
        else:
            flush()
            wire.append(("EVALSHA", SCRIPT_SHAS[command.script], 0, *command.args))
            groups.append([command])
    flush()
    return wire, groups


_LENGTH = struct.Struct("!I")


def pack_messages(messages: list[bytes]) -> bytes:
    """``b`` then each message with a 4-byte length: many messages in one publish."""
    return b"b" + b"".join(_LENGTH.pack(len(m)) + m for m in messages)


def unpack_messages(data: bytes) -> Iterator[bytes]:
    """The messages of a container (or the message itself, when it is not one)."""
    if data[:1] != b"b":
        yield data
        return
    view = memoryview(data)
    offset = 1
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        yield data[offset:offset + length]
        offset += length


def _settle(command: _Command, result: Any) -> None:
    failed = isinstance(result, BaseException)
    if command.future is not None and not command.future.done():
        if isinstance(result, RedisError) and not isinstance(result, LinkDown):
            command.future.set_exception(LinkDown(str(result)) if isinstance(result, NoScriptError) else result)
        elif failed:
            command.future.set_exception(result)
        else:
            command.future.set_result(result)
    if command.on_result is not None:
        command.on_result(result)  # an exception object when the command failed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

