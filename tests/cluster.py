"""Real processes for the cluster tests: a redis-server, sentinels, and signal-server nodes.

Every service gets a free loopback port and its own temporary directory;
nothing is shared with other test runs on the machine. Waits are on output
lines (a node logs each change of its link to Redis), keyspace notifications of
the test's own redis-server, or messages, each bounded by a timeout. State that
announces no change is asked for through ``poll_until``, the one polling helper.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from .conftest import COMMAND, SECRET, TIMEOUT, Member, make_token

__all__ = ["free_port", "RedisServer", "RefusingRedis", "Sentinel", "Node", "poll_until"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


POLL_EVERY = 0.05  # seconds between two questions in poll_until


async def poll_until(predicate: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT * 2) -> None:
    """Ask ``predicate`` again every POLL_EVERY s until it is true; fail after ``timeout``.

    Only for state that emits no event a test can wait on: a node's /metrics
    gauge refreshed by its own ticks or copied from Redis on its own schedule,
    Redis's count of a channel's subscribers. Everything that announces its change (a log
    line, a keyspace notification, a message) is waited on instead, through
    ``_Process.line_matching``, ``Node.wait_ready`` or ``RedisServer.until``.
    """
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(POLL_EVERY)  # the interval between two questions
    except TimeoutError:
        raise AssertionError(f"{getattr(predicate, '__name__', predicate)} still false after {timeout} s") from None


class _Process:
    """A child process whose output is read continuously (so its pipe never fills)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def _spawn(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._reader = asyncio.get_running_loop().create_task(self._read(self.process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while raw := await process.stdout.readline():
            self.lines.append(raw.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def line_matching(self, pattern: str, timeout: float = TIMEOUT * 3, start: int = 0) -> re.Match[str]:
        """The first output line from index ``start`` on that matches ``pattern``."""
        async with asyncio.timeout(timeout):
            index = start
            while True:
                while index < len(self.lines):
                    match = re.search(pattern, self.lines[index])
                    if match:
                        return match
                    index += 1
                assert self.process is not None
                if self.process.returncode is not None and self._reader is not None and self._reader.done():
                    raise AssertionError(f"{self.name} exited before printing {pattern!r}: {self.lines[-20:]}")
                self._new_line.clear()
                await self._new_line.wait()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = TIMEOUT * 2) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            # A child of the child (nginx's worker) may hold the pipe a little longer.
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
            except TimeoutError:
                self._reader.cancel()
        return code

    async def kill(self) -> None:
        if self.running:
            self.signal(signal.SIGKILL)
            await self.wait()


class RedisServer(_Process):
    """A real redis-server without persistence, restartable on the same port (empty)."""

    def __init__(self, directory: Path, *extra: str) -> None:
        super().__init__("redis-server")
        self.directory = directory
        self.port = free_port()
        self.extra = extra

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.lines = []
        await self._spawn(
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--protected-mode", "no",
            # DEBUG is refused by default since Redis 7; the slow-Redis test needs it.
            "--enable-debug-command", "local", *self.extra,
        )
        await self.line_matching(r"Ready to accept connections")

    async def stop(self) -> None:
        if self.running:
            self.signal(signal.SIGKILL)
            await self.wait()

    async def command(self, *args: str | int) -> Any:
        """One command on a fresh connection (so CLIENT KILL never hits it)."""
        from redis.asyncio import Redis

        client = Redis(host="127.0.0.1", port=self.port, socket_timeout=TIMEOUT * 2)
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()

    async def until(
        self, predicate: Callable[[], Awaitable[bool]], *keys: str, timeout: float = TIMEOUT * 2
    ) -> None:
        """Wait until ``predicate`` (which reads ``keys``, glob patterns allowed) is true.

        Event-driven: keyspace notifications are switched on (CONFIG SET; a restart
        forgets it, so every wait sets it again) and the predicate is asked once
        subscribed, then again after each change of one of those keys (a write, a
        deletion, an expiry), never on a timer.
        """
        from redis.asyncio import Redis

        client = Redis(host="127.0.0.1", port=self.port, socket_timeout=TIMEOUT * 2)
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(timeout):
                await client.config_set("notify-keyspace-events", "KA")  # K: per key; A: every kind of change
                await pubsub.psubscribe(*(f"__keyspace@0__:{key}" for key in keys))
                confirmed = 0
                while confirmed < len(keys):  # Redis sends changes from here on: none is missed
                    reply = await pubsub.get_message(timeout=None)
                    confirmed += reply is not None and reply["type"] == "psubscribe"
                while not await predicate():
                    await pubsub.get_message(timeout=None)  # the next change of one of ``keys``
        except TimeoutError:
            raise AssertionError(f"{getattr(predicate, '__name__', predicate)} still false after {timeout} s "
                                 f"(watching {keys})") from None
        finally:
            await pubsub.aclose()
            await client.aclose()


class RefusingRedis:
    """Stands on a stopped redis-server's port for an outage: a connection a node opens is
    accepted, led through the client's hand-shake (HELLO answered, the rest +OK) until it
    names itself (CLIENT SETNAME signal-<node id>), then closed: that attempt fails as
    against a dead Redis. Attempts are counted per node, so an outage can last a number
    of every node's failed reconnections instead of a stretch of wall time."""

    HELLO = (b"%7\r\n+server\r\n+redis\r\n+version\r\n+7.0.0\r\n+proto\r\n:3\r\n+id\r\n:1\r\n"
             b"+mode\r\n+standalone\r\n+role\r\n+master\r\n+modules\r\n*0\r\n")

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts: dict[str, int] = {}  # by node id; "?" for one that never named itself
        self._attempted = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> RefusingRedis:
        self._server = await asyncio.start_server(self._refuse, "127.0.0.1", self.port)
        return self

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node = "?"
        try:
            async with asyncio.timeout(TIMEOUT):
                for _ in range(4):  # HELLO, a client option or two, then the name
                    command = await reader.read(4096)
                    name = re.search(rb"signal-([\w.-]+)", command)
                    if name or not command:
                        node = name.group(1).decode() if name else node
                        break
                    writer.write(self.HELLO if b"HELLO" in command else b"+OK\r\n")
        except (TimeoutError, OSError):
            pass
        writer.close()
        self.attempts[node] = self.attempts.get(node, 0) + 1
        self._attempted.set()

    async def failed(self, nodes: Sequence[str], times: int, timeout: float = TIMEOUT * 4) -> None:
        """Until each of ``nodes`` has failed to reach Redis ``times`` times here."""
        try:
            async with asyncio.timeout(timeout):
                while any(self.attempts.get(node, 0) < times for node in nodes):
                    self._attempted.clear()
                    await self._attempted.wait()
        except TimeoutError:
            raise AssertionError(f"attempts after {timeout} s: {self.attempts}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Sentinel(_Process):
    """A real redis-sentinel watching one master."""

    def __init__(self, directory: Path, master_port: int, name: str) -> None:
        super().__init__("redis-sentinel")
        self.directory = directory
        self.port = free_port()
        self.master_port = master_port
        self.master_name = name

    async def start(self) -> None:
        config = self.directory / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.directory}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 1000\n"
            f"sentinel failover-timeout {self.master_name} 5000\n"
            "sentinel resolve-hostnames no\n"
        )
        await self._spawn(shutil.which("redis-sentinel") or "redis-sentinel", str(config))
        await self.line_matching(r"Sentinel ID is|monitor master")


# The node's log lines for a change of its link to Redis (plain or inside JSON);
# "Redis unreachable at start-up" is not one: the link starts down.
REACHABLE = r"cluster: Redis reachable \(node "
UNREACHABLE = r"cluster: Redis unreachable; "


class Node(_Process):
    """One signal-server node: the real console script, on a free port."""

    def __init__(self, node_id: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        """``env``: more environment for the process (libfaketime's, say)."""
        super().__init__(f"node {node_id}")
        self.node_id = node_id
        self.args = list(args)
        self.env = env or {}
        self.port = 0

    async def start(self, wait_ready: bool = True) -> None:
        await self._spawn(
            *COMMAND, "--port", "0", "--node-id", self.node_id, *self.args,
            env={"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_LOG_LEVEL": "info", **self.env},
        )
        self.port = int((await self.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        if wait_ready:
            await self.wait_ready()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def readyz(self) -> int:
        async with ClientSession() as session, session.get(f"{self.base}/readyz") as response:
            return response.status

    @property
    def redis_up(self) -> bool:
        """The node's link to Redis as its log last told it (False before the first line).

        The node logs one line per change of that state, at the moment it changes;
        /readyz, signal_redis_up, joins and cross-node relay follow the same state.
        """
        for line in reversed(self.lines):
            if re.search(REACHABLE, line):
                return True
            if re.search(UNREACHABLE, line):
                return False
        return False

    async def wait_ready(self, ready: bool = True, timeout: float = TIMEOUT * 2) -> None:
        """Until the node's log says its link to Redis is up (``ready``) or down: what
        /readyz answers from then on, while nothing else changes it."""
        try:
            async with asyncio.timeout(timeout):
                while self.redis_up is not ready:
                    await self.line_matching(REACHABLE if ready else UNREACHABLE, timeout, start=len(self.lines))
        except TimeoutError:
            raise AssertionError(f"{self.name}: Redis not {'reachable' if ready else 'unreachable'} "
                                 f"after {timeout} s: {self.lines[-10:]}") from None

    async def metric(self, name: str) -> float:
        async with ClientSession() as session, session.get(f"{self.base}/metrics") as response:
            text = await response.text()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


class Clients:
    """WebSocket clients to any node, closed at the end of the test."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def connect(self, node: Node, user: str, room: str = "room-1", *, join: bool = True) -> Member:
        ws = await self.session.ws_connect(f"ws://127.0.0.1:{node.port}/webrtc/ws/{room}?token={make_token(user)}")
        member = Member(ws, user)
        if join:
            await member.expect("room_state")
        return member
