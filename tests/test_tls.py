"""TLS served by the command itself: verifying clients, reload on renewal and SIGHUP, bad files."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientConnectorCertificateError, ClientSession, ClientWebSocketResponse, TCPConnector, WSMsgType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signal_server.tls import CertificateReloader, TLSError

from .certs import Authority, Leaf, peer_serial
from .conftest import COMMAND, SECRET, TIMEOUT, Server, make_token

DAY = datetime.timedelta(days=1)
LISTENING = r"listening on https://127\.0\.0\.1:(\d+)"


class TLSFiles:
    """A CA, the certificate and key files the server is given, and what they hold now."""

    def __init__(self, directory: Path) -> None:
        self.authority = Authority()
        self.cert = directory / "fullchain.pem"
        self.key = directory / "privkey.pem"
        self.current = self.renew()

    def renew(self, common_name: str = "localhost", key_type: str = "ecdsa") -> Leaf:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_type == "rsa" else None
        self.current = self.authority.issue(common_name, key=key)
        self.current.install(self.cert, self.key)
        return self.current

    def args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return TLSFiles(tmp_path)


@pytest.fixture
async def session(tls: TLSFiles) -> AsyncIterator[ClientSession]:
    """A client that verifies the server's certificate against the test CA."""
    async with ClientSession(connector=TCPConnector(ssl=tls.authority.client_context())) as client:
        yield client


async def start_tls_server(start_server: Any, tls: TLSFiles, *args: str) -> tuple[Server, int]:
    server = await start_server("--port", "0", *tls.args(), *args, env={"SIGNAL_JWT_SECRET": SECRET})
    port = int((await server.line_matching(LISTENING)).group(1))
    return server, port


async def join(session: ClientSession, port: int, user: str, host: str = "127.0.0.1") -> ClientWebSocketResponse:
    ws = await session.ws_connect(f"wss://{host}:{port}/webrtc/ws/room?token={make_token(user)}")
    message = await ws.receive(timeout=TIMEOUT)
    assert message.type is WSMsgType.TEXT and json.loads(message.data)["type"] == "room_state", message
    return ws


def serial_of(ws: ClientWebSocketResponse) -> int:
    assert ws._conn is not None and ws._conn.transport is not None
    return peer_serial(ws._conn.transport.get_extra_info("ssl_object"))


async def next_json(ws: ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=TIMEOUT)
    assert message.type is WSMsgType.TEXT, message
    value: dict[str, Any] = json.loads(message.data)
    return value


# TLS 1.2 suites that a certificate of one key type only can serve.
SUITES = {"ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256", "rsa": "ECDHE-RSA-AES128-GCM-SHA256"}


async def handshake_serial(port: int, context: ssl.SSLContext, name: str = "localhost") -> int:
    """The serial of the certificate a bare TLS handshake gets (no HTTP); no SNI when ``name`` is an address."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name), TIMEOUT
    )
    try:
        return peer_serial(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()


async def test_https_and_wss_with_a_client_that_verifies(start_server, tls, session) -> None:
    """The command serves HTTPS and wss:// with the given chain; the client checks it (name and CA)."""
    server, port = await start_tls_server(start_server, tls)
    for host in ("127.0.0.1", "localhost"):
        async with session.get(f"https://{host}:{port}/healthz") as response:
            assert response.status == 200 and await response.json() == {"status": "ok"}
    alice = await join(session, port, "alice")
    bob = await join(session, port, "bob", host="localhost")
    assert (await next_json(alice))["type"] == "user_joined"
    assert serial_of(alice) == tls.current.serial
    assert alice._conn is not None and alice._conn.transport is not None
    assert alice._conn.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    for ws in (alice, bob):
        await ws.close()
    # A client that does not trust the test CA refuses the connection: verification is real.
    async with ClientSession() as untrusting:
        with pytest.raises(ClientConnectorCertificateError):
            await untrusting.get(f"https://127.0.0.1:{port}/healthz")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_tls_below_1_2_is_refused(start_server, tls, version) -> None:
    """TLS 1.2 is the floor: a client that offers only an older version (and would accept any
    cipher at all) gets no session; one that offers 1.2 does."""
    server, port = await start_tls_server(start_server, tls)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("ALL:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion[version]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake_serial(port, old)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await handshake_serial(port, old) == tls.current.serial


async def test_renewed_files_are_served_to_new_connections_and_open_ones_stay(start_server, tls, session) -> None:
    """Rewrite both files: the next handshake gets the new certificate, an open WebSocket carries on."""
    server, port = await start_tls_server(start_server, tls, "--tls-watch-interval", "0.1")
    old = tls.current
    alice = await join(session, port, "alice")
    new = tls.renew("renewed.example")
    await server.line_matching(r"TLS certificate reloaded: CN=renewed\.example")
    bob = await join(session, port, "bob")
    assert serial_of(bob) == new.serial != old.serial
    assert (await next_json(alice))["type"] == "user_joined"  # the old connection still receives
    await alice.send_json({"type": "ping", "payload": {}})
    assert (await next_json(alice))["type"] == "pong"  # and still sends
    assert serial_of(alice) == old.serial
    for ws in (alice, bob):
        await ws.close()


async def test_sighup_reloads_at_once(start_server, tls, session) -> None:
    """systemd's ExecReload sends SIGHUP: the new files are loaded without waiting for the watch."""
    server, port = await start_tls_server(start_server, tls, "--tls-watch-interval", "3600")
    new = tls.renew("hup.example")
    server.process.send_signal(signal.SIGHUP)
    await server.line_matching(r"TLS certificate reloaded: CN=hup\.example")
    ws = await join(session, port, "alice")
    assert serial_of(ws) == new.serial
    await ws.close()
    assert server.process.returncode is None


@pytest.mark.parametrize(("old", "new"), [("ecdsa", "rsa"), ("rsa", "ecdsa")])
async def test_a_renewal_with_another_key_type_replaces_the_old_certificate(start_server, tls, old, new) -> None:
    """An OpenSSL context holds one certificate per key type: a new RSA pair loaded over an ECDSA one
    left the ECDSA certificate in service, and browsers, which prefer ECDSA, kept getting it
    (expired or not). After the reload no client may get the old certificate."""
    tls.renew("old.example", key_type=old)
    server, port = await start_tls_server(start_server, tls, "--tls-watch-interval", "3600")
    old_serial = tls.current.serial
    fresh = tls.renew("new.example", key_type=new)
    server.process.send_signal(signal.SIGHUP)
    await server.line_matching(r"TLS certificate reloaded: CN=new\.example")
    for name in ("localhost", "127.0.0.1"):  # with SNI and without
        assert await handshake_serial(port, tls.authority.client_context(), name) == fresh.serial != old_serial
    only_old = tls.authority.client_context()
    only_old.maximum_version = ssl.TLSVersion.TLSv1_2
    only_old.set_ciphers(SUITES[old])
    with pytest.raises((ssl.SSLError, ConnectionError)):  # nothing to offer such a client now: refused
        await handshake_serial(port, only_old)
    only_new = tls.authority.client_context()
    only_new.maximum_version = ssl.TLSVersion.TLSv1_2
    only_new.set_ciphers(SUITES[new])
    assert await handshake_serial(port, only_new) == fresh.serial


async def test_a_bad_renewal_keeps_the_old_certificate_and_says_why(start_server, tls, session) -> None:
    """A certificate with another key (certbot halfway through): refused, logged, old pair kept."""
    server, port = await start_tls_server(start_server, tls, "--tls-watch-interval", "0.1")
    old = tls.current
    mismatched = Leaf(tls.authority.issue("half.example").cert_pem, tls.authority.issue().key_pem, 0)
    mismatched.install(tls.cert, tls.key)
    line = (await server.line_matching(r"TLS reload failed.*")).group(0)
    assert "--tls-key" in line and "does not match" in line and "previous certificate" in line
    ws = await join(session, port, "alice")
    assert serial_of(ws) == old.serial
    fixed = tls.renew("fixed.example")  # the second half of the renewal lands
    await server.line_matching(r"TLS certificate reloaded: CN=fixed\.example")
    assert serial_of(await join(session, port, "bob")) == fixed.serial
    assert (await next_json(ws))["type"] == "user_joined"


async def test_an_expired_renewal_is_refused_and_the_old_certificate_kept(start_server, tls, session) -> None:
    """A renewal outside its validity window would fail every new handshake: refused, logged as an error."""
    server, port = await start_tls_server(start_server, tls, "--tls-watch-interval", "0.1")
    old = tls.current
    tls.authority.issue("expired.example", shift=-3 * DAY).install(tls.cert, tls.key)
    line = (await server.line_matching(r"TLS reload failed.*")).group(0)
    assert "--tls-cert" in line and "expired on" in line, line
    tls.authority.issue("early.example", shift=3 * DAY).install(tls.cert, tls.key)
    line = (await server.line_matching(r"TLS reload failed.*not valid before.*")).group(0)
    assert serial_of(await join(session, port, "alice")) == old.serial


async def test_a_fifo_or_huge_file_is_refused_without_blocking(tls, caplog) -> None:
    """A FIFO in the certificate's place would block a plain read forever; a huge file is not read whole."""
    reloader = CertificateReloader(str(tls.cert), str(tls.key))
    tls.cert.unlink()
    os.mkfifo(tls.cert)
    with caplog.at_level(logging.ERROR, logger="signal_server.tls"):
        assert not await asyncio.wait_for(reloader.check_async(), TIMEOUT)
        assert "is not a regular file" in caplog.text
        tls.cert.unlink()
        tls.cert.write_bytes(tls.current.cert_pem + b"#" * (1 << 20))
        assert not await asyncio.wait_for(reloader.check_async(), TIMEOUT)
        assert "larger than 1024 KiB" in caplog.text
    tls.renew()
    assert await reloader.check_async()


async def test_a_stalled_tls_handshake_is_dropped_within_the_handshake_timeout(start_server, tls) -> None:
    """A client that connects and never says hello is cut off by --handshake-timeout, not after 60 s."""
    server, port = await start_tls_server(start_server, tls, "--handshake-timeout", "0.5")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT):
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass  # an abort is as good as a close here
    finally:
        writer.close()


def test_each_change_is_tried_once(tls, caplog) -> None:
    """The periodic check logs a bad renewal once, not every few seconds until it is fixed."""
    reloader = CertificateReloader(str(tls.cert), str(tls.key))
    assert reloader.context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert not reloader.check()  # nothing changed
    tls.key.write_text("not a key")
    with caplog.at_level(logging.INFO, logger="signal_server.tls"):
        assert not reloader.check()
        assert not reloader.check()
        assert not reloader.check()
    failures = [r for r in caplog.records if "TLS reload failed" in r.getMessage()]
    assert len(failures) == 1 and "is not a PEM private key" in failures[0].getMessage()
    tls.renew()
    assert reloader.check()


async def test_the_watch_survives_an_unexpected_error(tls, caplog) -> None:
    """One failed check (an OSError from stat, say) is logged; the watch goes on to the next."""
    reloader = CertificateReloader(str(tls.cert), str(tls.key))
    calls: list[int] = []
    second = asyncio.Event()

    async def check() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        second.set()
        return False

    reloader.check_async = check  # type: ignore[method-assign]
    watcher = asyncio.create_task(reloader.watch(0.01))
    try:
        await asyncio.wait_for(second.wait(), TIMEOUT)
    finally:
        watcher.cancel()
    assert any("disk on fire" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def _write_rsa_1024(tls: TLSFiles) -> None:
    """A matching pair whose key OpenSSL's security level refuses (RSA 1024)."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    tls.authority.issue(key=weak).install(tls.cert, tls.key)


def _write_encrypted_key(tls: TLSFiles) -> None:
    key = serialization.load_pem_private_key(tls.current.key_pem, password=None)
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase nobody can type"),
        )
    )


BAD_FILES = {
    "garbage key": (
        lambda tls: tls.key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n"), "--tls-key", "not a PEM private key"
    ),
    "key of another certificate": (
        lambda tls: tls.key.write_bytes(tls.authority.issue().key_pem), "--tls-key", "does not match"
    ),
    "encrypted key": (_write_encrypted_key, "--tls-key", "is encrypted"),
    "garbage certificate": (lambda tls: tls.cert.write_text("hello"), "--tls-cert", "not a PEM certificate"),
    "missing certificate": (lambda tls: tls.cert.unlink(), "--tls-cert", "cannot read"),
    "missing key": (lambda tls: tls.key.unlink(), "--tls-key", "cannot read"),
    "key too weak for OpenSSL": (_write_rsa_1024, "--tls-cert", "refused by OpenSSL"),
    "expired certificate": (
        lambda tls: tls.authority.issue(shift=-3 * DAY).install(tls.cert, tls.key), "--tls-cert", "expired on"
    ),
    "certificate not yet valid": (
        lambda tls: tls.authority.issue(shift=3 * DAY).install(tls.cert, tls.key), "--tls-cert", "not valid before"
    ),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_files_fail_at_start_with_one_line(tls, case) -> None:
    spoil, flag, words = BAD_FILES[case]
    spoil(tls)
    result = run_command(*tls.args())
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"signal-server: error: {flag}: ") and words in lines[0], lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("given", "missing"), [("--tls-cert", "--tls-key"), ("--tls-key", "--tls-cert")])
def test_half_a_pair_is_an_error(tls, given, missing) -> None:
    path = tls.cert if given == "--tls-cert" else tls.key
    result = run_command(given, str(path))
    assert result.returncode == 2 and result.stderr.startswith(f"signal-server: error: {missing}: "), result.stderr


def test_reloader_errors_are_tls_errors(tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="--tls-cert: cannot read"):
        CertificateReloader(str(tmp_path / "none.pem"), str(tmp_path / "none.key"))


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "--port", "0", *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, "SIGNAL_JWT_SECRET": SECRET},
    )
