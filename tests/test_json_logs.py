"""--log-format json: one object a line with the structured fields, access lines included, no tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from aiohttp import ClientSession, WSMsgType
from yarl import URL

from signal_server.logs import REDACTED, JsonFormatter, TokenRedactingFilter

from .conftest import SECRET, TIMEOUT, Server, make_token


async def record_matching(server: Server, **wanted: Any) -> dict[str, Any]:
    """Read the server's output until a JSON record has every ``wanted`` field; every line must be JSON."""
    while True:
        line = (await server.line_matching(r".")).string
        record: dict[str, Any] = json.loads(line)  # fails the test on any non-JSON line
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        if all(record.get(key) == value for key, value in wanted.items()):
            return record


async def test_records_are_json_with_fields_and_no_token(start_server) -> None:
    """Start-up, join, close and the access line: JSON records, fields set, the query token redacted."""
    server = await start_server("--port", "0", "--log-format", "json", env={"SIGNAL_JWT_SECRET": SECRET})
    started = await record_matching(server, logger="signal_server", level="info")
    url = started["url"]
    assert started["message"] == f"signal-server listening on {url}" and started["level"] == "info"
    assert started["time"].endswith("+00:00")
    token = make_token("alice")
    async with ClientSession() as session:
        ws = await session.ws_connect(f"{url.replace('http', 'ws')}/webrtc/ws/room-9?token={token}")
        assert (await ws.receive(timeout=TIMEOUT)).type is WSMsgType.TEXT
        joined = await record_matching(server, logger="signal_server.handlers", room="room-9")
        assert joined["user"] == "alice" and joined["message"].startswith("join ")
        await ws.close()
        closed = await record_matching(server, logger="signal_server.handlers", clean=True)
        assert (closed["room"], closed["user"], closed["code"]) == ("room-9", "alice", 1000)
        access = await record_matching(server, logger="aiohttp.access")
        assert f"/webrtc/ws/room-9?token={REDACTED}" in access["message"]
        assert access["status"] == 101 and access["remote"] == "127.0.0.1"
        assert isinstance(access["duration"], float)
        # The same token under a percent-encoded name is still the token to the server.
        encoded = make_token("bob")
        raw = URL(f"{url.replace('http', 'ws')}/webrtc/ws/room-9?%74oken={encoded}", encoded=True)
        ws = await session.ws_connect(raw)
        assert (await ws.receive(timeout=TIMEOUT)).type is WSMsgType.TEXT
        await ws.close()
        access = await record_matching(server, logger="aiohttp.access")
        assert f"/webrtc/ws/room-9?%74oken={REDACTED}" in access["message"]
    assert not [line for line in server.lines if token in line or encoded in line]


def test_a_traceback_stays_on_one_line_and_is_redacted() -> None:
    """Exceptions become an ``exc`` field of the same one-line record, tokens taken out."""
    logger = logging.getLogger("aiohttp.server")
    try:
        raise ValueError("bad request line GET /webrtc/ws/r?token=secret.jwt.value HTTP/1.1")
    except ValueError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "Error handling request %s", ("/?token=abc",), sys.exc_info()
        )
    TokenRedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    body = json.loads(line)
    assert body["level"] == "error" and body["logger"] == "aiohttp.server"
    assert body["message"] == f"Error handling request /?token={REDACTED}"
    assert "ValueError" in body["exc"] and "secret.jwt.value" not in line and "abc" not in line


def test_fields_are_only_the_known_ones() -> None:
    """The access log's raw extras (request line, Referer) are never copied into the record."""
    record = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, "GET /?token=[redacted]", None, None)
    record.__dict__.update(
        first_request_line="GET /?token=raw HTTP/1.1",
        request_header={"Referer": "https://app.example/?token=raw"},
        room="r", node="node-1", response_status=200,
    )
    body = json.loads(JsonFormatter().format(record))
    assert "raw" not in json.dumps(body)
    assert body["room"] == "r" and body["node"] == "node-1" and body["status"] == 200


async def test_dev_mode_banner_is_a_record_without_tokens(start_server) -> None:
    """In JSON mode the dev banner is a warning record pointing at /dev/token; it prints no token."""
    server = await start_server("--port", "0", "--log-format", "json")
    started = await record_matching(server, logger="signal_server", level="info")
    warning = await record_matching(server, logger="signal_server", level="warning")
    assert warning["message"].startswith("DEV MODE") and f"{started['url']}/dev/token?user=NAME" in warning["message"]
    assert not [line for line in server.lines if "eyJ" in line]  # no JWT anywhere


async def send_raw_request(url: str, request: bytes) -> bytes:
    """Bytes as a hostile client writes them (no client library would send these); the status line back."""
    host, port = URL(url).host, URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    status = await asyncio.wait_for(reader.readline(), TIMEOUT)
    writer.close()
    await writer.wait_closed()
    return status


async def test_header_bytes_that_are_not_utf8_are_logged_escaped_not_dropped(start_server) -> None:
    """A User-Agent of invalid UTF-8 used to fail the JSON encoder: the request went unlogged."""
    server = await start_server("--port", "0", "--log-format", "json", env={"SIGNAL_JWT_SECRET": SECRET})
    url = (await record_matching(server, logger="signal_server", level="info"))["url"]
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: evil\xff\xfe\r\nConnection: close\r\n\r\n"
    assert (await send_raw_request(url, request)).startswith(b"HTTP/1.1 200")
    access = await record_matching(server, logger="aiohttp.access")
    assert '"evil\\xff\\xfe"' in access["message"], access
    assert not [line for line in server.lines if "Logging error" in line]


async def test_a_malformed_request_is_one_info_line_without_a_traceback(start_server) -> None:
    """aiohttp logs a traceback at ERROR for each malformed request: 30 bytes in, 2 KiB of log out."""
    server = await start_server("--port", "0", "--log-format", "json", env={"SIGNAL_JWT_SECRET": SECRET})
    url = (await record_matching(server, logger="signal_server", level="info"))["url"]
    token = make_token("alice")
    request = f"GET /webrtc/ws/x?token={token}&a=".encode() + b"\xff HTTP/1.1\r\nHost: x\r\n\r\n"
    assert (await send_raw_request(url, request)).startswith(b"HTTP/1.0 400")
    error = await record_matching(server, logger="aiohttp.server")
    assert error["level"] == "info" and "exc" not in error, error
    assert error["message"].startswith("Error handling request from 127.0.0.1: 400 ")
    assert token not in error["message"]


async def test_a_token_outside_the_query_is_redacted_too(start_server) -> None:
    """A valid token where the server does not look for one (a ";token=" path parameter, a request
    that is not HTTP) is still a valid token: it must not reach the log either."""
    server = await start_server("--port", "0", "--log-format", "json", env={"SIGNAL_JWT_SECRET": SECRET})
    url = (await record_matching(server, logger="signal_server", level="info"))["url"]
    token = make_token("alice")
    requests = {
        "path parameter": f"GET /healthz;token={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "not HTTP": f"token={token}\r\n\r\n",
        "dots encoded": f"GET /healthz/{token.replace('.', '%2E')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    }
    for request in requests.values():
        await send_raw_request(url, request.encode())
        await record_matching(server, logger="aiohttp.access")  # written after any error record
    signature = token.rsplit(".", 1)[1]
    assert not [line for line in server.lines if signature in line]
