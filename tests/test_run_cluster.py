"""``make run-cluster`` as a newcomer uses it: the printed links, a node killed, the API, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

from aiohttp import ClientSession

from .cluster import _Process
from .conftest import TIMEOUT, Member

ROOT = Path(__file__).parent.parent


def consecutive_free_ports(count: int) -> int:
    """A base port with ``count`` free ports from it on (run-cluster takes port..port+4)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError("no run of free ports")


class RunCluster(_Process):
    async def start(self, port: int) -> None:
        await self._spawn(sys.executable, "-m", "tools.run_cluster", "--port", str(port), env={"PYTHONPATH": str(ROOT)})


async def test_a_node_killed_leaves_the_cluster_running_and_ctrl_c_ends_it_cleanly() -> None:
    port = consecutive_free_ports(5)
    cluster = RunCluster("run-cluster")
    await cluster.start(port)
    try:
        alice_url = (await cluster.line_matching(r"alice: (http://\S+)", timeout=TIMEOUT * 6)).group(1)
        listed = (await cluster.line_matching(r"Node pids: .*")).group(0)
        pids = {name: int(pid) for name, pid in re.findall(r"(node\d) (\d+)", listed)}
        admin = (await cluster.line_matching(r"SIGNAL_ADMIN_TOKEN=(\S+) ")).group(1)
        await cluster.line_matching(r"Ctrl-C stops everything")
        assert sorted(pids) == ["node1", "node2", "node3"]
        token = alice_url.partition("token=")[2]
        async with ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/demo?token={token}")
            alice = Member(ws, "alice")
            await alice.expect("room_state")
            node = (await cluster.line_matching(r"\[(node\d)\] .*join room=demo user=alice")).group(1)
            start = len(cluster.lines)
            os.kill(pids[node], signal.SIGKILL)
            await cluster.line_matching(rf"run-cluster: {node} exited \(-9\)", start=start)
            # The supervisor keeps the rest up: the room service API answers through nginx.
            for _ in range(3):  # a round-robin turn may still pick the dead node (nginx then tries the next)
                async with session.get(
                    f"http://127.0.0.1:{port}/webrtc/rooms", headers={"Authorization": f"Bearer {admin}"}
                ) as response:
                    assert response.status == 200, await response.text()
                    assert "rooms" in json.loads(await response.text())
            await ws.close()
        start = len(cluster.lines)
        cluster.signal(signal.SIGINT)  # what Ctrl-C sends to the supervisor
        assert await cluster.wait() == 0, cluster.lines[start:]
        assert not any("a process exited" in line or "stopping the rest" in line for line in cluster.lines[start:])
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())  # stopped and reaped
    finally:
        if cluster.running:  # Ctrl-C stops its children too (they have sessions of their own)
            cluster.signal(signal.SIGINT)
            await cluster.wait(timeout=TIMEOUT * 8)
