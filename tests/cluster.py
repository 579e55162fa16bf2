"""Real processes for the cluster tests: a redis-server, sentinels, and signal-server nodes.

Every service gets a free loopback port and its own temporary directory;
nothing is shared with other test runs on the machine. Waits are on output
lines, HTTP answers or messages, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from .conftest import COMMAND, SECRET, TIMEOUT, Member, make_token

__all__ = ["free_port", "RedisServer", "Sentinel", "Node", "wait_until"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(predicate: Any, timeout: float = TIMEOUT * 2, what: str = "condition") -> None:
    """Poll an async predicate until true (for state only observable by asking, like /readyz)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


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

    async def wait_ready(self, ready: bool = True, timeout: float = TIMEOUT * 2) -> None:
        async def check() -> bool:
            return (await self.readyz() == 200) is ready

        await wait_until(check, timeout)

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
