"""The demo call through nginx round-robin in front of two nodes: each tab on its own node."""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from tools.run_cluster import nginx_config

from .cluster import Node, RedisServer, _Process, free_port
from .conftest import make_token
from .realclients import (
    CONNECTED_PEERS,
    WAIT_MS,
    frames_above,
    launch_browser,
    open_and_join,
    require_loopback_only,
    wait_for,
)

pytestmark = pytest.mark.netns


class Nginx(_Process):
    def __init__(self, directory: Path, node_ports: list[int]) -> None:
        super().__init__("nginx")
        self.port = free_port()
        self.config = directory / "nginx.conf"
        self.config.write_text(nginx_config(self.port, node_ports, directory))
        self.directory = directory

    async def start(self) -> None:
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "nginx"
        # At notice level nginx says "start worker processes" once its listening sockets are open.
        await self._spawn(nginx, "-e", "stderr", "-g", "error_log stderr notice;",
                          "-c", str(self.config), "-p", str(self.directory))
        await self.line_matching(r"start worker processes")

    async def kill(self) -> None:
        """SIGTERM: the master stops its workers too (SIGKILL would orphan them)."""
        if self.running:
            self.signal(signal.SIGTERM)
            await self.wait()


@pytest.fixture
async def balanced(tmp_path: Path) -> AsyncIterator[tuple[Nginx, list[Node]]]:
    require_loopback_only()
    redis = RedisServer(tmp_path)
    await redis.start()
    args = ["--redis-url", redis.url, "--node-ttl", "5", "--heartbeat", "30"]
    nodes = [Node("web1", args), Node("web2", args)]
    nginx: Nginx | None = None
    try:
        for node in nodes:
            await node.start()
        nginx = Nginx(tmp_path, [node.port for node in nodes])
        await nginx.start()
        yield nginx, nodes
    finally:
        for process in (nginx, *nodes, redis):
            if process is not None:
                await process.kill()


async def test_demo_call_through_the_balancer_spans_two_nodes(balanced: tuple[Nginx, list[Node]]) -> None:
    """Two tabs open the demo page through nginx; their WebSockets land on different nodes; the call connects."""
    nginx, nodes = balanced
    async with launch_browser() as browser:
        pages: list[Any] = []
        for user in ("alice", "bob"):
            context = await browser.new_context()
            page = await context.new_page()
            page.on("console", lambda message, user=user: print(f"[{user}] {message.text}"))
            token = make_token(user, name=user.title())
            await open_and_join(page, f"http://127.0.0.1:{nginx.port}/?room=lb&token={token}")
            pages.append(page)
        for page in pages:
            await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
            await wait_for(page, frames_above(0), timeout=WAIT_MS)
    # Round-robin put the two WebSockets on different nodes: each node logged one join.
    joined = {node.node_id: [u for u in ("alice", "bob") if node.count(rf"join room=lb user={u}\b")] for node in nodes}
    assert sorted(map(len, joined.values())) == [1, 1], joined
    # Every answer names its node, which is how the README says to tell them apart.
    async with ClientSession() as session:
        seen = set()
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{nginx.port}/readyz") as response:
                assert response.status == 200
                seen.add(response.headers["X-Signal-Node"])
    assert seen == {"web1", "web2"}
