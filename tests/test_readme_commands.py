"""The README's commands, run exactly as written: the wscat walk-through (one shell
per terminal block), the embedding example, the token command and curl.

They use fixed ports (8080, 8081), so they run in the loopback-only network
namespace (`-m netns`), where those ports belong to this test alone. wscat comes
from the npm registry through test_wscat's fixture, installed by the first
(networked) half of `make test`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jwt
import pytest

from .docblocks import ROOT, OpenTerminal, fenced, section

pytestmark = pytest.mark.netns
README = (ROOT / "README.md").read_text()


def blocks(title: str, language: str) -> list[str]:
    return fenced(section(README, title), language)


@pytest.fixture
def terminal(wscat: Path, shells: OpenTerminal) -> OpenTerminal:
    """A shell per README block; wscat installed first (`npx --yes wscat` finds it offline)."""
    return shells


@pytest.fixture
def wscat_dir(wscat: Path) -> Path:
    """wscat's directory, where `npx --yes wscat` finds it offline; `.venv` there is the repo's."""
    link = wscat / ".venv"
    if not link.exists():
        link.symlink_to(ROOT / ".venv")
    return wscat


async def test_the_wscat_walk_through_as_written(terminal, wscat_dir):
    """Server, alice, bob, the typed messages, carol's -x offer and curl, each block in its own shell."""
    server_block, alice_block, bob_block, carol_block, curl_block = blocks("Trying it with wscat", "sh")
    server = await terminal(server_block, ROOT)
    await server.line("listening on http://127.0.0.1:8080")
    alice = await terminal(alice_block, wscat_dir)
    state = await alice.message("room_state")
    assert state["payload"]["self"]["user_id"] == "alice"
    bob = await terminal(bob_block, wscat_dir)
    await bob.message("room_state")
    await alice.message("user_joined")

    typed = [line[2:] for line in blocks("Trying it with wscat", "text")[0].splitlines() if line.startswith("> ")]
    assert len(typed) == 3
    alice.type(typed[0])
    await alice.message("pong")
    alice.type(typed[1])
    offer = await bob.message("offer")
    assert offer["sender_id"] == "alice"
    alice.type(typed[2])
    error = await alice.message("error")
    assert error["payload"]["code"] == "UNSUPPORTED_TYPE"

    carol = await terminal(carol_block, wscat_dir)
    said = await carol.finish()  # sleep 10 | ... -w 3 ends by itself
    offer = await alice.message("offer")
    assert offer["sender_id"] == "carol", said
    config = json.loads((await (await terminal(curl_block, ROOT)).finish()).strip().splitlines()[-1])
    assert "iceServers" in config


async def test_the_embedding_example_as_written(terminal, tmp_path):
    """app.py from the README serves its own page and the sub-app on 8081; its token and curl commands work."""
    (app_source,) = blocks("Embedding", "python")
    (try_block,) = blocks("Embedding", "sh")
    secret = re.search(r'SECRET = "([^"]+)"', app_source)
    assert secret and len(secret.group(1).encode()) >= 32, "the example's HS256 secret must be 32 bytes or more"
    assert secret.group(1) in try_block
    (tmp_path / "app.py").write_text(app_source)
    app = await terminal(f"exec {ROOT / '.venv' / 'bin' / 'python'} app.py", tmp_path)
    await app.line("Running on http://127.0.0.1:8081")
    config = json.loads((await (await terminal(try_block, ROOT)).finish()).strip().splitlines()[-1])
    assert "iceServers" in config
    page = await (await terminal("curl -sf http://127.0.0.1:8081/", ROOT)).finish()
    assert page.startswith("my app")


async def test_the_token_command_as_written(terminal):
    """`signal-server token alice --name Alice --ttl 3600 --room demo --jwt-secret "$SECRET"`."""
    (line,) = re.findall(r"^signal-server token .*$", README, re.MULTILINE)
    secret = "a-reader's-own-secret-of-32-or-more-bytes"
    script = f"export PATH={ROOT / '.venv' / 'bin'}:$PATH SECRET=\"{secret}\"\n{line}\n"
    token = (await (await terminal(script, ROOT)).finish()).strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["name"] == "Alice" and claims["rooms"] == ["demo"]
    assert claims["exp"] - claims["iat"] == 3600


async def test_the_webhook_receiver_as_written(terminal, tmp_path):
    """receiver.py from the README, then the server command next to it: a join reaches it, verified."""
    (receiver_source,) = blocks("The app's backend: room service API and webhooks", "python")
    (run_block,) = blocks("The app's backend: room service API and webhooks", "sh")
    (tmp_path / "receiver.py").write_text(receiver_source)
    script = run_block.replace(".venv/bin/", f"{ROOT / '.venv' / 'bin'}/")
    shell = await terminal(script, tmp_path)
    await shell.line("listening on http://127.0.0.1:8080")
    secret = re.search(r'--jwt-secret "([^"]+)"', run_block)
    assert secret
    token = jwt.encode({"sub": "alice", "exp": 2**31 - 1}, secret.group(1), algorithm="HS256")
    (tmp_path / "join.py").write_text(
        "import asyncio, aiohttp\n"
        "async def main():\n"
        "    async with aiohttp.ClientSession() as s:\n"
        f"        ws = await s.ws_connect('ws://127.0.0.1:8080/webrtc/ws/demo?token={token}')\n"
        "        print((await ws.receive()).data[:40])\n"
        "asyncio.run(main())\n"
    )
    join = f"exec {ROOT / '.venv' / 'bin' / 'python'} join.py"
    await (await terminal(join, tmp_path)).finish()
    assert "room_started demo" in await shell.line("room_started")
    assert "'user_id': 'alice'" in await shell.line("participant_joined")
