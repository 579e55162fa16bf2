"""deploy/: the nginx site under a real nginx, the systemd unit under systemd-analyze, the sample config.

nginx is Debian's package (``make test`` installs it when missing). Each test
runs its own nginx as a foreground process from a temporary prefix, loading
the shipped site file with only its machine-specific lines (listen
addresses, upstream, certificate paths) swapped for the test's. The test
binds nginx's listening sockets itself and hands them over the way nginx's
own binary upgrade does (the NGINX environment variable), so there is no
port race and no waiting for nginx to come up: connections queue in the
backlog until it accepts them.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, TCPConnector, WSMsgType

from signal_server.settings import Settings, load_settings

from .certs import Authority
from .conftest import COMMAND, SECRET, TIMEOUT, make_token

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
SITE = DEPLOY / "nginx" / "signal-server.conf"
UNIT = DEPLOY / "signal-server.service"
SHIPPED_BINARY = "/opt/signal-server/bin/signal-server"


def find_command(name: str) -> str:
    """A Debian command, also where /usr/sbin is not on PATH (non-root shells)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found, f"{name} is missing: `make test` installs it (Makefile SYSTEM_COMMANDS)"
    return found


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each shipped line exactly once, so a drift in the file fails the test."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{SITE.name} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Nginx:
    """A real nginx in the foreground, prefix and files in a temporary directory."""

    def __init__(self, directory: Path, site: str, sockets: list[socket.socket]) -> None:
        self.directory = directory
        (directory / "signal-server.conf").write_text(site)
        temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir()
        (directory / "nginx.conf").write_text(
            f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 128; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {directory}/signal-server.conf;
}}
"""
        )
        fds = [sock.fileno() for sock in sockets]
        self.output = (directory / "nginx.out").open("wb")
        self.process = subprocess.Popen(
            [find_command("nginx"), "-p", str(directory), "-c", str(directory / "nginx.conf"),
             "-e", str(directory / "error.log")],
            pass_fds=fds, env={"NGINX": "".join(f"{fd};" for fd in fds)},
            stdout=self.output, stderr=subprocess.STDOUT,
        )

    def error_log(self) -> str:
        """What nginx said: its error log and anything it printed before opening it."""
        paths = (self.directory / "error.log", self.directory / "nginx.out")
        return "".join(path.read_text() for path in paths if path.exists())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()


@contextmanager
def running_nginx(directory: Path, site: str, sockets: list[socket.socket]) -> Iterator[Nginx]:
    nginx = Nginx(directory, site, sockets)
    for sock in sockets:
        sock.close()  # nginx holds them now
    try:
        yield nginx
    finally:
        nginx.stop()


class Proxied:
    """The signaling command behind nginx, with the addresses clients use."""

    def __init__(self, https_port: int, http_port: int, authority: Authority, nginx: Nginx) -> None:
        self.https_port = https_port
        self.http_port = http_port
        self.authority = authority
        self.nginx = nginx

    async def join(self, user: str, source: str, **headers: str) -> tuple[ClientSession, ClientWebSocketResponse]:
        """Connect from ``source`` (a loopback address) through nginx's TLS port."""
        session = ClientSession(
            connector=TCPConnector(ssl=self.authority.client_context(), local_addr=(source, 0))
        )
        url = f"wss://127.0.0.1:{self.https_port}/webrtc/ws/room?token={make_token(user)}"
        try:
            ws = await session.ws_connect(url, headers=headers)
        except BaseException:
            await session.close()
            raise
        return session, ws


@pytest.fixture
async def proxied(start_server, tmp_path: Path) -> AsyncIterator[Proxied]:
    server = await start_server(
        "--port", "0", "--trusted-proxy", "127.0.0.1", "--max-connections-per-ip", "1",
        env={"SIGNAL_JWT_SECRET": SECRET},
    )
    signal_port = int((await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
    authority = Authority()
    leaf = authority.issue()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    leaf.install(cert, key)
    https, http = listening_socket(), listening_socket()
    https_port, http_port = https.getsockname()[1], http.getsockname()[1]
    site = substitute(
        SITE.read_text(),
        {
            "server 127.0.0.1:8080;": f"server 127.0.0.1:{signal_port};",
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
            "listen [::]:443 ssl;": "",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen [::]:80;": "",
            "/etc/letsencrypt/live/signal.example.com/fullchain.pem;": f"{cert};",
            "/etc/letsencrypt/live/signal.example.com/privkey.pem;": f"{key};",
        },
    )
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    with running_nginx(nginx_dir, site, [https, http]) as nginx:
        try:
            yield Proxied(https_port, http_port, authority, nginx)
        finally:
            print(nginx.error_log())  # shown by pytest when a test failed
        assert nginx.process.poll() is None, nginx.error_log()


async def expect(ws: ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    message = await ws.receive(timeout=TIMEOUT)
    assert message.type is WSMsgType.TEXT, message
    body: dict[str, Any] = json.loads(message.data)
    assert body["type"] == kind, body
    return body


async def test_a_room_through_nginx_with_limits_on_the_forwarded_address(proxied: Proxied) -> None:
    """Through the shipped site (TLS at nginx, WebSocket upgrade): per-IP limits count the real clients.

    The server allows one connection per address and sees every connection
    come from nginx (127.0.0.1). Clients on 127.0.0.2 and 127.0.0.3 each get
    their one connection, a second one from 127.0.0.2 is refused, and a
    forged X-Forwarded-For does not get it past the limit.
    """
    sessions: list[ClientSession] = []
    try:
        session, ann = await proxied.join("ann", "127.0.0.2")
        sessions.append(session)
        await expect(ann, "room_state")
        session, cat = await proxied.join("cat", "127.0.0.3")
        sessions.append(session)
        state = await expect(cat, "room_state")
        assert [p["user_id"] for p in state["payload"]["participants"]] == ["ann", "cat"]
        assert (await expect(ann, "user_joined"))["payload"]["user_id"] == "cat"
        await ann.send_json({"type": "offer", "payload": {"type": "offer", "sdp": "v=0", "target_user_id": "cat"}})
        assert (await expect(cat, "offer"))["sender_id"] == "ann"
        for forged in ({}, {"X-Forwarded-For": "127.0.0.9"}):
            session, ben = await proxied.join("ben", "127.0.0.2", **forged)
            sessions.append(session)
            error = await expect(ben, "error")
            assert error["payload"]["code"] == "TOO_MANY_CONNECTIONS", error
            closing = await ben.receive(timeout=TIMEOUT)
            assert closing.type is WSMsgType.CLOSE and closing.data == 4430, closing
    finally:
        for session in sessions:
            await session.close()


async def test_plain_http_is_redirected_to_https(proxied: Proxied) -> None:
    """To the site's own name: a Host header the client chose must not pick the redirect's target."""
    async with ClientSession() as session:
        url = f"http://127.0.0.1:{proxied.http_port}/webrtc/config"
        async with session.get(url, allow_redirects=False, headers={"Host": "evil.example"}) as response:
            assert response.status == 301
            assert response.headers["Location"] == "https://signal.example.com/webrtc/config"


async def test_http_endpoints_pass_through(proxied: Proxied) -> None:
    """/webrtc/config answers through nginx with the client's bearer token."""
    async with ClientSession(connector=TCPConnector(ssl=proxied.authority.client_context())) as session:
        url = f"https://127.0.0.1:{proxied.https_port}/webrtc/config"
        async with session.get(url, headers={"Authorization": f"Bearer {make_token('ann')}"}) as response:
            assert response.status == 200 and "iceServers" in await response.json()
        async with session.get(f"https://127.0.0.1:{proxied.https_port}/webrtc/config") as response:
            assert response.status == 401


def test_nginx_timeouts_outlast_the_heartbeat() -> None:
    """nginx cuts a WebSocket idle for proxy_read_timeout; keepalive traffic comes every 2 x heartbeat."""
    text = SITE.read_text()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        match = re.search(rf"^\s*{directive} (\d+)s;", text, re.MULTILINE)
        assert match, directive
        assert int(match.group(1)) > 2 * Settings().heartbeat, directive


# ------------------------------------------------------------------ systemd


def shipped_unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's command (verify checks that it exists)."""
    text = UNIT.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(SHIPPED_BINARY, COMMAND[0]))
    return unit


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = shipped_unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [find_command("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own exposure score says OK (at most 2.0 of 10), and the issue's items are set."""
    unit = shipped_unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [find_command("systemd-analyze"), "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == "yes" and settings["User"] not in ("root", "0")
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"


async def test_the_sample_config_starts_the_command(start_server, tmp_path: Path) -> None:
    """deploy/signal.toml as shipped, with only host, port and certificate paths overridden by flags."""
    environment = {"SIGNAL_JWT_SECRET": SECRET, "SIGNAL_TURN_SECRET": "a-coturn-static-auth-secret"}  # the env file
    assert load_settings({}, environment, str(DEPLOY / "signal.toml")).log_format == "json"
    authority = Authority()
    authority.issue().install(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = await start_server(
        "--config", str(DEPLOY / "signal.toml"), "--host", "127.0.0.1", "--port", "0",
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
        env=environment,
    )
    url = json.loads((await server.line_matching(r"listening on https://")).string)["url"]
    async with ClientSession(connector=TCPConnector(ssl=authority.client_context())) as session:
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 200

