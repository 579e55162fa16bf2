"""Key rotation at run time: SIGHUP reads the key file again, swaps the verifier and flushes the token cache.

The process-level tests run the real command; the settings tests cover the
file sources themselves (--jwt-secret-file, --jwt-public-key FILE).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession, WSMsgType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signal_server.settings import SettingsError, load_settings, read_key_files

from .conftest import SECRET, TIMEOUT, make_token

NEW_SECRET = "the-rotated-secret-that-is-long-enough-for-hs256"


async def first_message(session: ClientSession, port: str, room: str, token: str) -> dict[str, Any]:
    """Connect and return the first message: room_state, or the in-band error of a refusal."""
    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/{room}?token={token}")
    try:
        message = await ws.receive(timeout=TIMEOUT)
        assert message.type is WSMsgType.TEXT, message
        return dict(json.loads(message.data))
    finally:
        await ws.close()


async def joins(session: ClientSession, port: str, room: str, token: str) -> bool:
    message = await first_message(session, port, room, token)
    if message["type"] == "room_state":
        return True
    assert message["type"] == "error" and message["payload"]["code"] == "UNAUTHORIZED", message
    return False


async def cache_hits(session: ClientSession, port: str) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("signal_token_cache_hits_total "):
            return float(line.split()[1])
    raise AssertionError("signal_token_cache_hits_total is not exposed")


async def test_sighup_rotates_the_secret_file_and_refuses_tokens_of_the_old_one(start_server, tmp_path: Path) -> None:
    """Old tokens (one of them cached) are refused in-band after the reload; new ones join."""
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET + "\n")  # as `echo` writes it
    server = await start_server("--port", "0", "--jwt-secret-file", str(secret_file))
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    old = make_token("alice")
    async with ClientSession() as session:
        assert await joins(session, port, "before", old)
        assert await joins(session, port, "before", old)
        assert await cache_hits(session, port) >= 1  # the second join was served from the cache
        never_seen = make_token("bob")  # signed by the old key, not cached

        secret_file.write_text(NEW_SECRET)
        server.process.send_signal(signal.SIGHUP)
        await server.line_matching(r"JWT key reloaded from .*jwt-secret")

        assert not await joins(session, port, "after", old)  # was cached: the flush forgot it
        assert not await joins(session, port, "after", never_seen)
        assert await joins(session, port, "after", make_token("carol", secret=NEW_SECRET))

        # A bad new secret (too short) keeps the current one and says why.
        secret_file.write_text("short")
        server.process.send_signal(signal.SIGHUP)
        line = (await server.line_matching(r"JWT key reload failed.*")).group(0)
        assert "still verifying with the previous key" in line and "--jwt-secret-file" in line
        assert "at least 32 bytes" in line
        assert await joins(session, port, "after", make_token("dave", secret=NEW_SECRET))
        assert not await joins(session, port, "after", old)
    assert server.process.returncode is None


def public_key_pem(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def es256(private: ec.EllipticCurvePrivateKey, sub: str) -> str:
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, pem, algorithm="ES256")


async def test_sighup_rotates_the_public_key_file(start_server, tmp_path: Path) -> None:
    """--jwt-public-key FILE: the same rotation for ES256; a private key in its place is refused, old key kept."""
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(public_key_pem(first))
    server = await start_server(
        "--port", "0", "--jwt-algorithm", "ES256", "--jwt-public-key", str(key_file),
    )
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    old = es256(first, "alice")
    async with ClientSession() as session:
        assert await joins(session, port, "room", old)
        key_file.write_bytes(public_key_pem(second))
        server.process.send_signal(signal.SIGHUP)
        await server.line_matching(r"JWT key reloaded from .*jwt\.pem")
        assert not await joins(session, port, "room", old)
        assert await joins(session, port, "room", es256(second, "bob"))

        key_file.write_bytes(
            second.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        )
        server.process.send_signal(signal.SIGHUP)
        line = (await server.line_matching(r"JWT key reload failed.*")).group(0)
        assert "private key" in line
        assert await joins(session, port, "room", es256(second, "carol"))


async def test_sighup_with_an_unchanged_key_keeps_the_cache(start_server, tmp_path: Path) -> None:
    """systemd reloads for the TLS files too: the same key must not cost every client a full verification."""
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET)
    server = await start_server("--port", "0", "--jwt-secret-file", str(secret_file))
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    token = make_token("alice")
    async with ClientSession() as session:
        assert await joins(session, port, "room", token)
        server.process.send_signal(signal.SIGHUP)
        await server.line_matching(r"JWT key in .* unchanged")
        before = await cache_hits(session, port)
        assert await joins(session, port, "room", token)
        assert await cache_hits(session, port) == before + 1


# ------------------------------------------------------------ file sources


def test_the_secret_file_is_read_without_its_line_break(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\r\n")
    settings = load_settings({"jwt-secret-file": str(path)}, {})
    assert settings.jwt_secret == SECRET and settings.jwt_secret_file == str(path)
    path.write_text(NEW_SECRET)
    assert read_key_files(settings).jwt_secret == NEW_SECRET


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        ("short\n", {}, "--jwt-secret-file: .* must be at least 32 bytes"),
        (SECRET, {"jwt-secret": SECRET}, "either --jwt-secret or --jwt-secret-file"),
    ],
)
def test_bad_secret_files_name_the_option(tmp_path: Path, content: str, flags: dict[str, str], message: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_settings({"jwt-secret-file": str(path), **flags}, {})


def test_a_fifo_in_place_of_a_key_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    """SIGHUP reads on the event loop: opening a FIFO with no writer must not block it."""
    path = tmp_path / "secret"
    os.mkfifo(path)
    with pytest.raises(SettingsError, match="not a regular file"):
        load_settings({"jwt-secret-file": str(path)}, {})
    missing = tmp_path / "missing"
    with pytest.raises(SettingsError, match="--jwt-public-key: cannot read"):
        load_settings({"jwt-public-key": str(missing), "jwt-algorithm": "ES256"}, {})
