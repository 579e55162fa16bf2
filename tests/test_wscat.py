"""wscat from the npm registry, driven exactly as README.md and the dev banner show it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import ClientSession

from .conftest import TIMEOUT, Server, make_token

ROOT = Path(__file__).parent.parent
SECRET = "change-me-to-32-or-more-random-bytes"


def readme_command(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "README.md").read_text())
    assert match, f"README.md has no line matching {pattern!r}"
    return match.group(0)


async def spawn(command: str, cwd: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Run a shell command line with stdin held open: wscat quits at end of input."""
    return await asyncio.create_subprocess_shell(
        command, cwd=cwd, env={**os.environ, **env}, start_new_session=True,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def stop(process: asyncio.subprocess.Process) -> None:
    # npx runs wscat as a child: end the whole process group, not just the shell.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
    if process.stdin is not None:
        process.stdin.close()


async def run_until(command: str, cwd: Path, env: dict[str, str], wanted: str) -> str:
    """Run a shell command line, return the first output line containing ``wanted``."""
    process = await spawn(command, cwd, env)
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(TIMEOUT * 4):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, f"wscat exited first: {seen}"
                seen.append(line)
                if wanted in line:
                    return line
    finally:
        await stop(process)


async def start_known_secret_server(start_server: Callable[..., Awaitable[Server]]) -> int:
    server = await start_server("--port", "0", env={"SIGNAL_JWT_SECRET": SECRET})
    return int((await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))


async def test_the_readme_wscat_line_receives_room_state(wscat, start_server):
    """README: `npx --yes wscat -c "ws://127.0.0.1:8080/webrtc/ws/demo?token=$ALICE"` joins the room."""
    port = await start_known_secret_server(start_server)
    line = readme_command(r'npx --yes wscat -c "ws://127\.0\.0\.1:8080/webrtc/ws/demo\?token=\$ALICE"')
    assert f"--jwt-secret {SECRET}" not in line
    command = line.replace(":8080/", f":{port}/")
    token_line = readme_command(r"ALICE=\$\(\.venv/bin/signal-server token alice --jwt-secret [^)]+\)")
    secret = token_line.rsplit(" ", 1)[-1].rstrip(")")
    assert secret == SECRET, "README and this test must use the same example secret"
    alice = make_token("alice", secret=SECRET)
    first = await run_until(command, wscat, {"ALICE": alice}, "room_state")
    state = json.loads(first[first.index("{"):])
    assert state["payload"]["self"]["user_id"] == "alice" and state["room_id"] == "demo"


async def test_the_dev_banner_wscat_line_joins(wscat, start_server):
    """The wscat command that dev mode prints works as printed."""
    server = await start_server("--port", "0")
    printed = (await server.line_matching(r'(npx --yes wscat -c "[^"]+")')).group(1)
    first = await run_until(printed, wscat, {}, "room_state")
    assert json.loads(first[first.index("{"):])["payload"]["self"]["user_id"] == "alice"


async def test_an_offer_sent_with_wscat_reaches_another_client(wscat, start_server):
    """wscat -x sends an offer; the other participant gets it stamped with wscat's user."""
    port = await start_known_secret_server(start_server)
    url = f"ws://127.0.0.1:{port}/webrtc/ws/demo"
    async with ClientSession() as session:
        bob = await session.ws_connect(f"{url}?token={make_token('bob', secret=SECRET)}")
        assert json.loads((await bob.receive(timeout=TIMEOUT)).data)["type"] == "room_state"
        offer = json.dumps({"type": "offer", "payload": {"type": "offer", "sdp": "v=0 from wscat"}})
        command = (
            f'npx --yes wscat -c "{url}?token=$ALICE" -x {shlex.quote(offer)} -w 1'
        )
        process = await spawn(command, wscat, {"ALICE": make_token("alice", secret=SECRET)})
        try:
            kinds = []
            while True:
                message = json.loads((await bob.receive(timeout=TIMEOUT * 2)).data)
                kinds.append(message["type"])
                if message["type"] == "offer":
                    break
            assert kinds == ["user_joined", "offer"]
            assert message["sender_id"] == "alice" and message["payload"]["sender_id"] == "alice"
            assert message["payload"]["sdp"] == "v=0 from wscat"
        finally:
            await stop(process)
        await bob.close()
