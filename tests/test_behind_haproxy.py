"""Client addresses behind a real HAProxy, whose ``option forwardfor`` adds a header line of its own.

A client that sends its own ``X-Forwarded-For`` line ends up with two lines at
the server: its forged one first, HAProxy's true one last. Reading only the
first line let every client choose its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import TIMEOUT, make_token
from .rawws import RawWebSocket

HAPROXY_CONFIG = """\
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 60s
    option forwardfor

frontend signal
    bind 127.0.0.1:{listen}
    default_backend nodes

backend nodes
    server node 127.0.0.1:{target}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            assert process.returncode is None, "haproxy exited"
            with contextlib.suppress(ConnectionError, OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)  # not yet listening: poll the port, bounded by the timeout


@contextlib.asynccontextmanager
async def haproxy(target_port: int, workdir: Path) -> AsyncIterator[int]:
    """A real HAProxy (Debian package, installed by `make test`) in front of ``target_port``."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    listen = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(listen=listen, target=target_port))
    subprocess.run([binary, "-c", "-f", str(config)], check=True, capture_output=True, timeout=30)
    process = await asyncio.create_subprocess_exec(
        binary, "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_listening(listen, process)
        yield listen
    finally:
        process.terminate()
        await process.wait()


@pytest.fixture
async def behind_haproxy(app_client: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, int]]:
    client = await app_client(trusted_proxies=("127.0.0.1",), max_connections_per_ip=1)
    async with haproxy(client.server.port, tmp_path) as port:
        yield client, port


async def join_through(port: int, user: str, source: str, forged: str) -> RawWebSocket:
    return await RawWebSocket.connect(
        "127.0.0.1", port, f"/webrtc/ws/room-1?token={make_token(user)}",
        headers=[("X-Forwarded-For", forged)], local_host=source,
    )


async def test_a_forged_forwarded_for_line_does_not_choose_the_address(behind_haproxy):
    _, port = behind_haproxy
    first = await join_through(port, "alice", "127.0.0.2", forged="6.6.6.6")
    other = await join_through(port, "bob", "127.0.0.3", forged="6.6.6.6")
    again = await join_through(port, "carol", "127.0.0.2", forged="7.7.7.7")
    try:
        await first.expect("room_state")
        await other.expect("room_state")  # another real address: not limited by the forged one
        # The same real address, whatever it claims: over its limit of one.
        assert (await again.expect("error"))["payload"]["code"] == "TOO_MANY_CONNECTIONS"
    finally:
        for socket_ in (first, other, again):
            await socket_.aclose()
