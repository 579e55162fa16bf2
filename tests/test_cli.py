"""The command line: settings precedence, one-line errors, tokens, dev mode, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession, WSMsgType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from signal_server import create_app
from signal_server.auth import TokenVerifier
from signal_server.settings import OPTIONS, Settings, SettingsError, load_settings

from .conftest import COMMAND, SECRET, TIMEOUT, make_settings, make_token


def test_flags_override_environment_override_file(tmp_path: Path) -> None:
    """Flag > SIGNAL_* > TOML > default, for scalars and repeatable options."""
    config = tmp_path / "signal.toml"
    config.write_text('port = 7000\nmax_participants = 3\nstun-url = ["stun:a:1", "stun:b:2"]\nheartbeat = 9\n')
    env = {"SIGNAL_PORT": "7100", "SIGNAL_MAX_PARTICIPANTS": "4"}
    settings = load_settings({"port": "7200"}, env, str(config))
    assert settings.port == 7200
    assert settings.max_participants == 4
    assert settings.heartbeat == 9.0
    assert settings.stun_urls == ("stun:a:1", "stun:b:2")
    settings = load_settings({"stun-url": ["stun:c:3"]}, {"SIGNAL_CONFIG": str(config)})
    assert settings.stun_urls == ("stun:c:3",) and settings.port == 7000
    assert load_settings({}, {}) == Settings()


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({"port": "abc"}, {}, "--port: expected an integer"),
        ({"port": "70000"}, {}, "--port: must be between"),
        ({}, {"SIGNAL_MAX_PARTICIPANTS": "0"}, "SIGNAL_MAX_PARTICIPANTS: must be between"),
        ({"stun-url": ["http://x"]}, {}, "--stun-url: must start with stun:"),
        ({"allowed-origin": ["app.example"]}, {}, "--allowed-origin: must be an origin"),
        ({"jwt-algorithm": "RS256"}, {}, "--jwt-public-key: RS256 needs"),
        ({"jwt-public-key": "/nonexistent.pem", "jwt-algorithm": "RS256"}, {}, "--jwt-public-key: cannot read"),
        ({"log-level": "loud"}, {}, "--log-level: must be one of"),
        ({"trusted-proxy": ["not-an-ip"]}, {}, "--trusted-proxy: must be an IP"),
    ],
)
def test_bad_values_name_their_option(flags, env, expected) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(flags, env)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown key 'prot'"):
        load_settings({}, {}, str(config))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "flag"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        (["--max-message-size", "-5"], {}, "--max-message-size"),
        ([], {"SIGNAL_HEARTBEAT": "fast"}, "SIGNAL_HEARTBEAT"),
        (["--config", "/nonexistent.toml"], {}, "--config"),
        (["--host", "0.0.0.0"], {}, "--jwt-secret: dev mode"),
        (["--jwt-secret", "a"], {}, "--jwt-secret: must be at least 32 bytes"),
        ([], {"SIGNAL_JWT_SECRET": "x" * 31}, "SIGNAL_JWT_SECRET: must be at least 32 bytes"),
        ([], {"SIGNAL_JWT_SECRET": ""}, "SIGNAL_JWT_SECRET: set but empty"),  # not dev mode
        ([], {"SIGNAL_JWT_PUBLIC_KEY": ""}, "SIGNAL_JWT_PUBLIC_KEY: set but empty"),
        ([], {"SIGNAL_TURN_SECRET": ""}, "SIGNAL_TURN_SECRET: set but empty"),
        # A TURN entry without credentials makes browsers throw: every call would break.
        (["--turn-url", "turn:127.0.0.1:3478"], {}, "--turn-url: a TURN server needs credentials"),
        (["--turn-url", "turn:127.0.0.1:3478", "--turn-username", "u"], {}, "--turn-credential: static TURN"),
        (["--turn-secret", "s"], {}, "--turn-secret: TURN credentials without --turn-url"),
        (["--kept-bytes", "2000000"], {}, "--kept-bytes"),
        (["--redis-sentinel", "127.0.0.1:26379"], {}, "--redis-master"),
        (["--redis-url", "http://x"], {}, "--redis-url"),
        (["--node-id", "a b"], {}, "--node-id"),
    ],
)
def test_command_errors_are_one_line_exit_2(args, env, flag) -> None:
    """A bad flag or value: one line on stderr naming it, exit 2, no traceback."""
    result = run(*args, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and lines[0].startswith("signal-server: error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_the_documentations_example_secrets_serve_loopback_only(tmp_path: Path) -> None:
    """A secret printed in the README is no secret: pasted into production, it is refused."""
    config = tmp_path / "signal.toml"
    config.write_text('jwt_secret = "replace-with-the-output-of-secrets.token_urlsafe(32)"\nhost = "0.0.0.0"\n')
    result = run("--config", str(config), "--port", "0")
    assert result.returncode == 2 and "example secret" in result.stderr, result
    result = run("--host", "::", "--port", "0", env={"SIGNAL_JWT_SECRET": "change-me-to-32-or-more-random-bytes"})
    assert result.returncode == 2 and "example secret" in result.stderr, result
    # The README's webhook walk-through: its JWT secret and its webhook secret.
    result = run("--host", "0.0.0.0", "--port", "0", "--jwt-secret", "an-hs256-secret-of-32-bytes-or-more!!")
    assert result.returncode == 2 and "--jwt-secret: this is an example secret" in result.stderr, result
    result = run(
        "--host", "0.0.0.0", "--port", "0", "--webhook-url", "http://127.0.0.1:9/hooks",
        "--webhook-secret", "a-webhook-secret-of-32-bytes-or-more", env={"SIGNAL_JWT_SECRET": SECRET},
    )
    assert result.returncode == 2 and "--webhook-secret: this is an example secret" in result.stderr, result


def test_an_embedded_app_with_an_example_secret_warns(caplog: pytest.LogCaptureFixture) -> None:
    """create_app cannot know the address its host binds: it says the secret is the README's."""
    with caplog.at_level(logging.WARNING, logger="signal_server"):
        create_app(make_settings(jwt_secret="replace-me-with-32-or-more-random-bytes-from-your-vault"))
    assert "an example secret from the documentation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="signal_server"):
        create_app(make_settings(jwt_secret=SECRET))
    assert "example secret" not in caplog.text


def test_prefixes_of_flags_are_not_flags() -> None:
    """argparse would take --max-participant for --max-participants; TOML refuses the same typo."""
    result = run("--max-participant", "3")
    assert result.returncode == 2 and "unrecognized arguments: --max-participant" in result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("signal-server 0."), result


async def test_a_busy_port_says_what_to_do(start_server, unused_tcp_port: int) -> None:
    first = await start_server("--port", str(unused_tcp_port), env={"SIGNAL_JWT_SECRET": SECRET})
    await first.line_matching("listening on")
    result = await asyncio.to_thread(run, "--port", str(unused_tcp_port), env={"SIGNAL_JWT_SECRET": SECRET})
    assert result.returncode == 2 and "--port 0" in result.stderr and "SIGNAL_PORT" in result.stderr, result


async def test_production_without_an_origin_allow_list_is_warned_about(start_server) -> None:
    server = await start_server("--port", "0", env={"SIGNAL_JWT_SECRET": SECRET})
    await server.line_matching("no --allowed-origin")
    await server.line_matching("listening on")


def test_a_short_secret_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "signal.toml"
    config.write_text('jwt_secret = "change-me"\n')
    result = run("--config", str(config))
    assert result.returncode == 2 and "jwt_secret in" in result.stderr and "32 bytes" in result.stderr, result


def test_a_secret_that_is_not_utf8_is_refused_at_start() -> None:
    """Bytes the OS cannot decode arrive as surrogate escapes, and would fail inside every request."""
    env = {**os.environb, b"SIGNAL_JWT_SECRET": b"\xff" * 40}
    completed = subprocess.run([*COMMAND, "--port", "0"], capture_output=True, timeout=30, env=env)
    assert completed.returncode == 2, completed
    assert b"SIGNAL_JWT_SECRET: must be valid UTF-8" in completed.stderr


def ec_public_key_file(tmp_path: Path, curve: ec.EllipticCurve) -> Path:
    path = tmp_path / "ec.pem"
    path.write_bytes(ec.generate_private_key(curve).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return path


@pytest.mark.parametrize(("algorithm", "curve"), [("RS256", ec.SECP256R1()), ("ES256", ec.SECP384R1())])
def test_a_key_that_does_not_fit_the_algorithm_exits_2_at_start(tmp_path: Path, algorithm, curve) -> None:
    """It used to start fine and answer every request with a 500."""
    key = ec_public_key_file(tmp_path, curve)
    result = run("--port", "0", "--jwt-algorithm", algorithm, "--jwt-public-key", str(key))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("signal-server: error: --jwt-public-key: not a usable"), lines


def test_an_hs512_secret_shorter_than_its_hash_exits_2_at_start() -> None:
    """32 bytes pass for HS256 but not for HS512 (RFC 7518 3.2): it used to start, PyJWT warning."""
    result = run("--port", "0", "--jwt-algorithm", "HS512", "--jwt-secret", "k" * 32)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines == ["signal-server: error: --jwt-secret: must be at least 64 bytes for HS512"], lines


def test_tracebacks_are_not_chained_to_a_missing_uvloop(monkeypatch) -> None:
    """The loop used to run inside ``except ImportError``: every logged error said uvloop was missing."""
    from signal_server import cli

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError

    async def fails() -> None:
        raise ValueError("a bug while serving")

    with pytest.raises(ValueError) as caught:
        cli._run(fails())
    assert caught.value.__context__ is None


def test_the_command_freezes_start_up_objects_and_collects_young_ones_in_large_batches() -> None:
    """A join storm must not re-traverse start-up's modules, nor collect every few joins (cli._tune_collector)."""
    probe = (
        "import gc, sys\n"
        "from signal_server import cli\n"
        "def instead(coroutine):\n"
        "    coroutine.close()\n"
        "    print(gc.get_freeze_count(), gc.get_threshold()[0])\n"
        "cli._run = instead\n"
        "sys.exit(cli.main(['--port', '0', '--jwt-secret', sys.argv[1], '--allowed-origin', 'https://a.example']))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, SECRET], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    frozen, threshold = map(int, result.stdout.split())
    assert frozen > 10_000  # the modules, classes and functions loaded at start
    assert threshold == 50_000


async def test_the_access_log_redacts_an_encoded_token_name(start_server, unused_tcp_port: int) -> None:
    """``?%74oken=`` is ``token`` to the server, so it must be redacted too."""
    server = await start_server("--port", str(unused_tcp_port), env={"SIGNAL_JWT_SECRET": SECRET})
    await server.line_matching("listening on")
    token = make_token("alice")
    async with ClientSession() as session:
        # encoded=True: sent as written (yarl would otherwise normalise %74 to t)
        url = URL(f"ws://127.0.0.1:{unused_tcp_port}/webrtc/ws/demo?%74oken={token}", encoded=True)
        ws = await session.ws_connect(url)
        state = json.loads((await ws.receive(timeout=TIMEOUT)).data)
        assert state["type"] == "room_state"
        await ws.close()
    line = (await server.line_matching(r"aiohttp\.access.*GET /webrtc/ws/demo")).string
    assert token not in line and "%74oken=[redacted]" in line, line


def test_token_command_signs_with_the_configured_secret() -> None:
    result = run("token", "carol", "--name", "Carol", "--ttl", "120", "--room", "a", "--room", "b",
                 env={"SIGNAL_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol" and claims["name"] == "Carol" and claims["rooms"] == ["a", "b"]
    assert claims["exp"] - claims["iat"] == 120


def test_token_command_mints_for_the_configured_audience_and_issuer() -> None:
    """A server configured with an audience and issuer refuses tokens without them:
    the command that mints tokens for it must put them in."""
    env = {"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_JWT_AUDIENCE": "my-app", "SIGNAL_JWT_ISSUER": "https://id.example"}
    result = run("token", "carol", env=env)
    assert result.returncode == 0, result.stderr
    verifier = TokenVerifier(make_settings(jwt_audience="my-app", jwt_issuer="https://id.example"))
    assert verifier.verify(result.stdout.strip()).user_id == "carol"


@pytest.mark.parametrize("command", ["token", "rooms"])
def test_help_of_a_subcommand_lists_only_what_it_uses(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0 and "--jwt-secret" in result.stdout and "--jwt-audience" in result.stdout
    for server_only in ("--max-participants", "--redis-url", "--tls-cert", "--port"):
        assert server_only not in result.stdout


def test_token_command_without_a_secret_fails_cleanly() -> None:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SIGNAL_")}
    result = subprocess.run([*COMMAND, "token", "carol"], capture_output=True, text=True, timeout=30, env=environ)
    assert result.returncode == 2 and "--jwt-secret" in result.stderr and "Traceback" not in result.stderr


def test_python_dash_m_is_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "signal_server", "token", "x", "--jwt-secret", SECRET],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "x"


@pytest.mark.parametrize(
    "claims", [(), ("--jwt-audience", "my-app", "--jwt-issuer", "https://id.example"), ("--jwt-algorithm", "HS512")]
)
async def test_dev_mode_prints_tokens_that_work(start_server, claims: tuple[str, ...]) -> None:
    """No secret: dev mode, loudly, with two tokens and a wscat line that join a room
    (with the audience and issuer the server requires, when it requires them; with a
    generated secret long enough for HS512)."""
    server = await start_server("--port", "0", *claims)
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    await server.line_matching("DEV MODE")
    alice = (await server.line_matching(r"token for alice: (\S+)")).group(1)
    bob = (await server.line_matching(r"token for bob: (\S+)")).group(1)
    wscat = (await server.line_matching(r'wscat -c "(ws://[^"]+)"')).group(1)
    assert wscat.endswith(f"token={alice}") and f":{port}/webrtc/ws/" in wscat
    async with ClientSession() as session:
        first = await session.ws_connect(wscat)
        second = await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/demo?token={bob}")
        state = json.loads((await second.receive(timeout=TIMEOUT)).data)
        assert [p["user_id"] for p in state["payload"]["participants"]] == ["alice", "bob"]
        await first.close()
        await second.close()


async def test_environment_sets_the_port(start_server, unused_tcp_port: int) -> None:
    """SIGNAL_PORT works the way `SIGNAL_PORT=9000 make run` relies on."""
    server = await start_server(env={"SIGNAL_PORT": str(unused_tcp_port)})
    await server.line_matching(rf"listening on http://127\.0\.0\.1:{unused_tcp_port}\b")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_closes_clients_with_1001_and_exits_0(start_server, signum) -> None:
    """On SIGTERM/SIGINT every client gets close 1001 and the process exits 0 within seconds."""
    server = await start_server("--port", "0", env={"SIGNAL_JWT_SECRET": SECRET})
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    async with ClientSession() as session:
        clients = [
            await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/room?token={make_token(user)}")
            for user in ("alice", "bob")
        ]
        for ws in clients:
            assert (await ws.receive(timeout=TIMEOUT)).type is WSMsgType.TEXT
        loop = asyncio.get_running_loop()
        started = loop.time()
        server.process.send_signal(signum)
        for ws in clients:
            message = await ws.receive(timeout=TIMEOUT)
            while message.type is WSMsgType.TEXT:
                message = await ws.receive(timeout=TIMEOUT)
            assert message.type is WSMsgType.CLOSE and message.data == 1001, message
        assert await asyncio.wait_for(server.process.wait(), TIMEOUT) == 0
        assert loop.time() - started < 5
    for user in ("alice", "bob"):  # the log says the code the client got, not the one it echoed
        await server.line_matching(rf"close room=room user={user} clean=False code=1001")


def test_readme_documents_every_option() -> None:
    """The README's configuration table names every flag and its variable."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for option in OPTIONS:
        assert f"`--{option.flag}" in readme and f"`{option.env}`" in readme, option.flag


def test_public_key_file_is_read_for_rs256(tmp_path: Path) -> None:
    """--jwt-public-key FILE with --jwt-algorithm RS256 loads the PEM text the verifier uses."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    path = tmp_path / "public.pem"
    path.write_text(pem)
    settings = load_settings({"jwt-public-key": str(path)}, {"SIGNAL_JWT_ALGORITHM": "rs256"})
    assert settings.jwt_public_key == pem and settings.jwt_algorithm == "RS256" and settings.auth_configured
    path.write_text("not a key")
    with pytest.raises(SettingsError, match="--jwt-public-key: .* is not a PEM file"):
        load_settings({"jwt-public-key": str(path), "jwt-algorithm": "RS256"}, {})


async def test_a_shutdown_that_hangs_ends_the_process_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of the shutdown is bounded, and if one still hangs (a library's close
    that never returns) the process exits 1 by the deadline instead of living on with
    its port closed and its node key alive (a supervisor would wait its whole stop timeout)."""
    from signal_server import cli
    from signal_server.hub import Hub

    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    listening = asyncio.Event()
    monkeypatch.setattr(cli, "_hard_exit", exited.set_result)
    monkeypatch.setattr(cli, "SHUTDOWN_DEADLINE", 0.5)
    monkeypatch.setattr(cli, "_announce", lambda *args, **kwargs: listening.set())
    never = asyncio.Event()

    async def hang(self: Hub) -> None:
        await never.wait()

    monkeypatch.setattr(Hub, "stop", hang)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(cli.serve(make_settings(host="127.0.0.1", port=0), stop=stop))
    await asyncio.wait_for(listening.wait(), TIMEOUT)
    stop.set()
    assert await asyncio.wait_for(exited, TIMEOUT) == 1
    never.set()
    await asyncio.wait_for(serving, TIMEOUT)


@pytest.mark.parametrize(("level", "logs_access"), [(logging.INFO, True), (logging.WARNING, False)])
async def test_no_access_logger_is_made_per_connection_when_nothing_would_be_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, level: int, logs_access: bool
) -> None:
    """Below INFO aiohttp would still build an AccessLogger for every connection, to write nothing."""
    from aiohttp import web

    from signal_server import cli

    runners: list[web.AppRunner] = []

    class Recorded(web.AppRunner):
        def __init__(self, app: web.Application, **kwargs: Any) -> None:
            super().__init__(app, **kwargs)
            runners.append(self)

    monkeypatch.setattr(web, "AppRunner", Recorded)
    caplog.set_level(level, logger="aiohttp.access")
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(cli.serve(make_settings(host="127.0.0.1", port=0), stop=stop), TIMEOUT)
    (runner,) = runners
    access = runner._kwargs["access_log"]
    assert (access is logging.getLogger("aiohttp.access")) if logs_access else (access is None)


async def test_webhooks_say_at_start_whether_they_are_on(start_server) -> None:
    """A receiver's origin (never its path or query) when on; a secret with no receiver is pointed out."""
    hooked = await start_server(
        "--port", "0", "--webhook-url", "http://127.0.0.1:9/hooks?token=secret-part",
        env={"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_WEBHOOK_SECRET": "w" * 32},
    )
    line = (await hooked.line_matching(r"webhooks: delivering to .*")).group(0)
    assert "http://127.0.0.1:9" in line and "secret-part" not in line and "/hooks" not in line
    unhooked = await start_server("--port", "0", env={"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_WEBHOOK_SECRET": "w" * 32})
    await unhooked.line_matching(r"--webhook-secret is set but no --webhook-url")
