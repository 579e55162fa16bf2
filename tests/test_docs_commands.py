"""The commands and files in the README and docs/, run as written (what test_readme_commands.py does not).

Each block is taken from its document by section and fence, so editing the
documentation changes what runs. The tests run in the loopback-only namespace
(`-m netns`), where the documented ports (8080, 443, 6380) are this test's
alone and `--host 0.0.0.0` reaches loopback only. What is substituted, and
nothing else:

* secrets: `$SECRET`, `$COTURN_SECRET` and `SIGNAL_JWT_SECRET` are set in the
  shell's environment, and the README's `signal.toml` placeholder secret (which
  the command refuses off loopback, checked here) is swapped for a real one;
* paths: `/etc/signal-server/tls` becomes a temporary directory; certbot's
  lineage is a directory holding a pair from a test authority;
* the deploy hook's group `signal-server` becomes the test's own group (the
  system user is not created here), and `systemctl` on its PATH is a stand-in
  that does what the unit's `ExecReload=/bin/kill -HUP $MAINPID` does;
* the Redis address `rediss://redis.internal:6380/0` becomes a real
  redis-server on `redis://127.0.0.1:6380/0` (no TLS, no DNS here).

Not run, and why:

* README `pip install .`: it needs the package index (the tests' network is
  loopback only); `make test` runs the same install into `.venv` (`pip install
  -e`), and the commands below run from there.
* docs/deployment.md blocks marked *On your server*: `useradd`, installing into
  `/opt` and `/etc`, `systemctl daemon-reload` / `enable --now`, `sudo certbot`
  (Let's Encrypt must reach a public name) and installing the nginx site into
  `/etc/nginx`. They change a real machine. tests/test_deploy.py loads the unit
  (`systemd-analyze verify`, `security`) and runs the nginx site under a real
  nginx; the sample config is started here and there.
* docs/deployment.md's JSON log lines and docs/protocol.md's JSON blocks are
  sample output and message shapes, not commands.
* README's `make test`, `make lint`, `make screenshot`, `make bench`: the
  suite itself, CI's lint, and two long generators.

Run elsewhere: the wscat walk-through (`make run` included), the embedding
example, the token command and the webhook receiver (test_readme_commands.py);
`make run-cluster` (test_run_cluster.py); `python -m signal_server`
(test_cli.py).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector, WSMsgType

from .certs import Authority, peer_serial
from .cluster import RedisServer
from .conftest import SECRET, TIMEOUT, make_token
from .docblocks import ROOT, OpenTerminal, Shell, fenced, replace_once, section
from .realclients import WAIT_MS, module_call

pytestmark = pytest.mark.netns
README = (ROOT / "README.md").read_text()
DEPLOYMENT = (ROOT / "docs" / "deployment.md").read_text()
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
CLIENT = (ROOT / "docs" / "client.md").read_text()
SAMPLE_CONFIG = (ROOT / "deploy" / "signal.toml").read_text()
VENV_PATH = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
COTURN_SECRET = "a-coturn-static-auth-secret-of-32-bytes"
# What deployment.md's /etc/signal-server/env holds (the sample config's TURN URLs need the secret).
ENV_FILE = {"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_TURN_SECRET": COTURN_SECRET}


async def listening(shell: Shell) -> str:
    """The base URL the command announced (text or JSON banner)."""
    line = await shell.line("listening on")
    found = re.search(r"listening on (\S+?)[\s\"]", line)
    assert found, line
    return found.group(1)


async def get_json(url: str, token: str | None = None, ssl: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with ClientSession(connector=TCPConnector(ssl=ssl)) as session:
        async with session.get(url, headers=headers) as response:
            return response.status, await response.json(content_type=None)


# ---------------------------------------------------------------- README


async def test_the_standalone_server_block_as_written(shells: OpenTerminal, tmp_path: Path) -> None:
    """README "Standalone server": the command with every flag, then again with the TLS flags the text adds."""
    install, command = fenced(section(README, "Standalone server"), "sh")[:2]
    assert install.strip() == "pip install ."  # not run: see the module docstring
    env = {"PATH": VENV_PATH, "SECRET": SECRET, "COTURN_SECRET": COTURN_SECRET}
    server = await shells(command, tmp_path, **env)
    assert await listening(server) == "http://0.0.0.0:8080"
    status, config = await get_json("http://127.0.0.1:8080/webrtc/config", make_token("alice"))
    assert status == 200, config
    assert "stun:stun.example.com:3478" in json.dumps(config) and "turn:turn.example.com:3478" in json.dumps(config)
    turn = next(entry for entry in config["iceServers"] if "turn:" in str(entry["urls"]))
    assert turn["username"].endswith(":alice") and turn["credential"], turn  # from --turn-secret
    async with ClientSession() as session:
        url = f"ws://127.0.0.1:8080/webrtc/ws/demo?token={make_token('alice')}"
        ws = await session.ws_connect(url, headers={"Origin": "https://app.example.com"})
        assert json.loads((await ws.receive(timeout=TIMEOUT)).data)["type"] == "room_state"
        await ws.close()
        refused = await session.ws_connect(url.replace("alice", "x"), headers={"Origin": "https://evil.example"})
        message = await refused.receive(timeout=TIMEOUT)
        assert message.type is WSMsgType.TEXT, message
        assert json.loads(message.data)["payload"]["code"] == "FORBIDDEN", message
    os.killpg(server.process.pid, signal.SIGTERM)
    await server.finish()

    tls_flags = re.search(r"Add `(--tls-cert fullchain\.pem --tls-key privkey\.pem)`", README)
    assert tls_flags, "the README's TLS sentence changed"
    authority = Authority()
    authority.issue().install(tmp_path / "fullchain.pem", tmp_path / "privkey.pem")
    server = await shells(f"{command.rstrip()} {tls_flags.group(1)}\n", tmp_path, **env)
    assert await listening(server) == "https://0.0.0.0:8080"
    status, _ = await get_json("https://127.0.0.1:8080/readyz", ssl=authority.client_context())
    assert status == 200


async def test_the_readme_config_file_as_written(shells: OpenTerminal, tmp_path: Path) -> None:
    """README "Configuration": the example signal.toml with `signal-server --config signal.toml`.

    As written it is refused (its secret is a placeholder and the host is not loopback); with a real
    secret in its place the same file serves, its keys in force.
    """
    (example,) = fenced(section(README, "Configuration"), "toml")
    (start,) = re.findall(r"started with `(signal-server --config signal\.toml)`", README)
    (tmp_path / "signal.toml").write_text(example)
    refused = await (await shells(start, tmp_path, PATH=VENV_PATH)).finish(status=2)
    assert "example secret" in refused, refused

    placeholder = tomllib.loads(example)["jwt_secret"]
    (tmp_path / "signal.toml").write_text(replace_once(example, {placeholder: SECRET}))
    server = await shells(start, tmp_path, PATH=VENV_PATH)
    assert await listening(server) == "http://0.0.0.0:8080"
    status, config = await get_json("http://127.0.0.1:8080/webrtc/config", make_token("alice"))
    assert status == 200 and "stun:stun.example.com:3478" in json.dumps(config), config
    async with ClientSession() as session:
        sockets = []
        for number in range(5):  # max_participants = 4
            ws = await session.ws_connect(
                f"ws://127.0.0.1:8080/webrtc/ws/demo?token={make_token(f'user{number}')}",
                headers={"Origin": "https://app.example.com"},
            )
            sockets.append(ws)
            body = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            expected = "room_state" if number < 4 else "error"
            assert body["type"] == expected, body
        assert body["payload"]["code"] == "ROOM_FULL", body
        for ws in sockets:
            await ws.close()


# ------------------------------------------------------------ docs/protocol.md


async def test_the_rooms_commands_as_written(shells: OpenTerminal, tmp_path: Path) -> None:
    """docs/protocol.md's `signal-server rooms` block, line by line, against a server on 8080."""
    (block,) = fenced(section(PROTOCOL, "Room service API"), "sh")
    lines = block.strip().splitlines()
    commands = [re.match(r"signal-server rooms (?:--url \S+ )?(\w+)", line) for line in lines]
    assert [match and match.group(1) for match in commands] == ["list", "show", "send", "kick", "close"], lines
    env = {"PATH": VENV_PATH, "SIGNAL_JWT_SECRET": SECRET}
    server = await shells("exec signal-server", tmp_path, **env)
    await listening(server)
    async with ClientSession() as session:
        members = {}
        for user in ("alice", "mallory"):
            members[user] = await session.ws_connect(f"ws://127.0.0.1:8080/webrtc/ws/room-1?token={make_token(user)}")
            assert json.loads((await members[user].receive(timeout=TIMEOUT)).data)["type"] == "room_state"
        alice, mallory = members["alice"], members["mallory"]

        async def run(line: str) -> Any:
            return json.loads(await (await shells(line, tmp_path, **env)).finish())

        async def next_message(ws: Any, kind: str) -> dict[str, Any]:
            while True:
                message = await ws.receive(timeout=TIMEOUT)
                assert message.type is WSMsgType.TEXT, message
                body: dict[str, Any] = json.loads(message.data)
                if body["type"] == kind:
                    return body

        listed, shown, sent, kicked, closed = lines
        assert [(r["room_id"], r["participants"]) for r in (await run(listed))["rooms"]] == [("room-1", 2)]
        assert sorted(p["user_id"] for p in (await run(shown))["participants"]) == ["alice", "mallory"]
        assert (await run(sent))["sent"] is True
        assert (await next_message(alice, "server_message"))["payload"] == {"text": "ending in 5 minutes"}
        assert (await run(kicked))["ban"] == 3600
        assert (await next_message(mallory, "error"))["payload"]["code"] == "KICKED"
        assert (await next_message(alice, "user_left"))["payload"]["reason"] == "kicked"
        await run(closed)
        assert (await next_message(alice, "error"))["payload"]["code"] == "ROOM_CLOSED"


# -------------------------------------------------------------- docs/client.md


async def test_the_client_example_as_written(browser: Any, servers: Any) -> None:
    """docs/client.md's module example in Chromium, against a live server, with bob already in the room.

    The page defines what the example leaves to the app (fetchTokenFromMyApp, localVideo, videoFor,
    removeVideo) and imports the example as a module next to signal-client.js; only the server URL is
    substituted. It runs to its end with nothing thrown, shows the camera, and bob sees alice join
    and then leave cleanly (reason ``left``, at once, not after a grace).
    """
    signal_server, page_server = servers
    (example,) = fenced(CLIENT, "js")
    server_url = f"http://127.0.0.1:{signal_server.port}"
    example = replace_once(example, {'"https://signal.example.com"': json.dumps(server_url)})
    bob = await module_call(browser, page_server, server_url, "bob", room="room-1")
    # The page is the page server's own document (Chromium lets only a loopback document fetch from
    # loopback); the example is served beside signal-client.js, where its relative import finds it.
    page = await module_call(browser, page_server, server_url, "alice", room="room-1", media=False, connect=False)
    page.on("console", lambda message: print(f"[example] {message.text}"))

    async def serve(route: Any) -> None:
        await route.fulfill(body=example, content_type="text/javascript")

    await page.route(f"http://localhost:{page_server.port}/client-example.js", serve)
    await page.evaluate(
        """token => {
          document.body.innerHTML = '<video id="local"></video>';
          window.log = [];
          addEventListener("error", (e) => window.log.push(["uncaught", String(e.message)]));
          addEventListener("unhandledrejection", (e) => window.log.push(["uncaught", String(e.reason)]));
          window.fetchTokenFromMyApp = async () => { window.log.push(["token"]); return token; };
          window.localVideo = document.getElementById("local");
          window.videoFor = (id) => { window.log.push(["videoFor", id]); return document.createElement("video"); };
          window.removeVideo = (id) => window.log.push(["removeVideo", id]);
          import("./client-example.js").then(
            () => window.log.push(["done"]), (e) => window.log.push(["uncaught", String(e)]));
        }""",
        make_token("alice"),
    )
    await page.wait_for_function("window.log.some(e => e[0] === 'done' || e[0] === 'uncaught')", timeout=WAIT_MS)
    log = await page.evaluate("window.log")
    assert ["done"] in log and not [entry for entry in log if entry[0] == "uncaught"], log
    assert ["token"] in log
    assert await page.evaluate("window.localVideo.srcObject?.getVideoTracks().length") == 1
    await bob.wait_for_function(
        "['participantjoined', 'participantleft'].every(t => window.events.some(e => e.type === t))",
        timeout=WAIT_MS,
    )
    left = await bob.evaluate("window.events.find(e => e.type === 'participantleft').args")
    assert left == [{"user_id": "alice", "username": "alice"}, "left"], left  # a clean leave, not a timeout


# ---------------------------------------------------------- docs/deployment.md


def deployment_block(title: str, language: str, index: int = 0) -> str:
    return fenced(section(DEPLOYMENT, title), language)[index]


TLS_SECTION = "2a. Serving browsers directly (TLS in the command)"
SHIPPED_TLS_DIR = "/etc/signal-server/tls"


def systemctl_stand_in(directory: Path, pid_file: Path) -> str:
    """A `systemctl` that logs its call and does what systemd does for the unit: ``reload`` and
    ``try-reload-or-restart`` run its ExecReload (SIGHUP to the main process) while it is active;
    when it is not, ``reload`` fails ("not active, cannot reload") and ``try-reload-or-restart``
    does nothing."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "systemctl"
    stand_in.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {directory}/systemctl.calls\n'
        '[ "$2" = signal-server ] || exit 1\n'
        f"[ -s {pid_file} ] && exec kill -HUP \"$(cat {pid_file})\"\n"
        'case "$1" in\n'
        "  try-reload-or-restart) exit 0 ;;\n"
        '  reload) echo "signal-server.service is not active, cannot reload." >&2; exit 1 ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    stand_in.chmod(0o755)
    return f"{bin_dir}:{VENV_PATH}"


async def test_tls_in_the_command_with_the_deploy_hook_as_written(shells: OpenTerminal, tmp_path: Path) -> None:
    """docs/deployment.md 2a: the sample config's TLS lines on 0.0.0.0:443, its certbot deploy hook run
    once by hand to install the first pair, the command started from the config, then the hook run for a
    renewal: the server takes the new certificate (reload through `systemctl try-reload-or-restart`, which
    the first run, before the unit is started, must not fail on)."""
    tls_lines = deployment_block(TLS_SECTION, "toml")
    assert tls_lines in SAMPLE_CONFIG, "2a's TOML lines are the sample config's"
    hook = deployment_block(TLS_SECTION, "sh", 1)
    assert hook.startswith("#!/bin/sh\n")
    tls_dir = tmp_path / "etc-signal-server-tls"
    group = grp.getgrgid(os.getgid()).gr_name
    assert hook.count("-g signal-server") == 2, hook
    hook = replace_once(hook, {f"dir={SHIPPED_TLS_DIR}\n": f"dir={tls_dir}\n"})
    hook = hook.replace("-g signal-server", f"-g {group}")
    (tmp_path / "hook").write_text(hook)
    config = tmp_path / "signal.toml"
    config.write_text(SAMPLE_CONFIG.replace(SHIPPED_TLS_DIR, str(tls_dir)))
    pid_file = tmp_path / "main.pid"
    path = systemctl_stand_in(tmp_path, pid_file)
    authority = Authority()
    lineage = tmp_path / "live" / "signal.example.com"
    lineage.mkdir(parents=True)

    async def certbot_renews(name: str) -> int:
        leaf = authority.issue(name)
        leaf.install(lineage / "fullchain.pem", lineage / "privkey.pem")
        ran = await shells("sh ./hook", tmp_path, PATH=path, RENEWED_LINEAGE=str(lineage))
        await ran.finish()
        return leaf.serial

    first = await certbot_renews("first.example")  # "run it once by hand"
    assert (tls_dir / "privkey.pem").stat().st_mode & 0o777 == 0o640
    server = await shells(
        f"echo $$ > {pid_file}; exec signal-server --config {config}", tmp_path,
        PATH=VENV_PATH, SIGNAL_TLS_WATCH_INTERVAL="3600", **ENV_FILE,
    )
    await listening(server)
    assert await handshake_serial(authority) == first
    renewed = await certbot_renews("renewed.example")
    await server.line("TLS certificate reloaded")
    assert await handshake_serial(authority) == renewed != first
    assert (tmp_path / "systemctl.calls").read_text() == "try-reload-or-restart signal-server\n" * 2


async def handshake_serial(authority: Authority) -> int:
    """The serial of the certificate served on 127.0.0.1:443 (the config's `port = 443`)."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", 443, ssl=authority.client_context(), server_hostname="localhost"),
        TIMEOUT,
    )
    try:
        return peer_serial(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()


FOUR_TLS_LINES = ('host = "0.0.0.0"\nport = 443\ntls_cert = "/etc/signal-server/tls/fullchain.pem"\n'
                  'tls_key = "/etc/signal-server/tls/privkey.pem"\n')


@pytest.mark.parametrize("title", ["2b. Behind nginx", "2c. Behind a cloud load balancer"])
async def test_the_proxied_configs_as_written(shells: OpenTerminal, tmp_path: Path, title: str) -> None:
    """2b and 2c: the sample config with its four TLS lines replaced by the section's, as the text says."""
    lines = deployment_block(title, "toml")
    config = tmp_path / "signal.toml"
    config.write_text(replace_once(SAMPLE_CONFIG, {FOUR_TLS_LINES: lines}))
    server = await shells(f"exec signal-server --config {config}", tmp_path, PATH=VENV_PATH, **ENV_FILE)
    values = tomllib.loads(lines)
    assert await listening(server) == f"http://{values['host']}:{values['port']}"
    status, _ = await get_json("http://127.0.0.1:8080/readyz")
    assert status == 200


async def test_many_nodes_config_as_written(shells: OpenTerminal, tmp_path: Path) -> None:
    """3: the sample config plus the Redis lines (address swapped for a local redis-server on 6380)."""
    lines = deployment_block("3. Many nodes on Redis", "toml")
    redis = RedisServer(tmp_path)
    redis.port = 6380
    await redis.start()
    try:
        lines = replace_once(lines, {"rediss://redis.internal:6380/0": "redis://127.0.0.1:6380/0"})
        config = tmp_path / "signal.toml"
        config.write_text(replace_once(SAMPLE_CONFIG, {FOUR_TLS_LINES: 'host = "127.0.0.1"\nport = 8080\n'}) + lines)
        server = await shells(f"exec signal-server --config {config}", tmp_path, PATH=VENV_PATH, **ENV_FILE)
        line = await server.line("Redis reachable")  # /readyz says 503 until then
        assert json.loads(line)["node"] == "node-a", line
        status, _ = await get_json("http://127.0.0.1:8080/readyz")
        assert status == 200
    finally:
        await redis.stop()


def test_every_block_is_run_or_marked(tmp_path: Path) -> None:
    """docs/deployment.md: a shell block either runs in a test above or says it is for a real server."""
    runnable = {deployment_block(TLS_SECTION, "sh", 1)}
    for block in fenced(DEPLOYMENT, "sh"):
        assert block in runnable or block.startswith("# On your server"), block
