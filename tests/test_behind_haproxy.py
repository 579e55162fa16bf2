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

from .conftest import make_token
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
    bind fd@{fd}
    default_backend nodes

backend nodes
    server node 127.0.0.1:{target}
"""


@contextlib.asynccontextmanager
async def haproxy(target_port: int, workdir: Path) -> AsyncIterator[int]:
    """A real HAProxy (Debian package, installed by `make test`) in front of ``target_port``.

    The listening socket is made here and handed over (``bind fd@N``): it
    accepts from the start, so nothing waits for HAProxy to come up.
    """
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(fd=listener.fileno(), target=target_port))
    subprocess.run([binary, "-c", "-f", str(config)], check=True, capture_output=True, timeout=30,
                   pass_fds=(listener.fileno(),))
    process = await asyncio.create_subprocess_exec(
        binary, "-db", "-f", str(config), pass_fds=(listener.fileno(),),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port: int = listener.getsockname()[1]
        yield port
    finally:
        process.terminate()
        await process.wait()
        listener.close()


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
