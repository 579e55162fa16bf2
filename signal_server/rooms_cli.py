"""``signal-server rooms ...``: the room service API from an operator's shell.

Each action is one HTTP request to a running server (any node of a cluster),
with an admin token minted for 60 seconds from the configured secret, or the
one given with ``--token`` / ``SIGNAL_ADMIN_TOKEN``. The JSON answer is
printed; an error answer goes to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from .auth import mint_token_for
from .settings import SettingsError, load_settings

__all__ = ["rooms_command"]

DEFAULT_URL = "http://127.0.0.1:8080/webrtc"
REQUEST_TIMEOUT = 10.0


def _fail(message: str, status: int = 2) -> int:
    print(f"signal-server rooms: error: {_printable(message)}", file=sys.stderr)
    return status


def _printable(text: str) -> str:
    """``text`` with every control and format character escaped: what a server
    answers never drives the operator's terminal (escape sequences, bidi overrides)."""
    return "".join(ch if ch.isprintable() or ch == "\n" else f"\\u{ord(ch):04x}" for ch in text)


def _segment(value: str) -> str:
    """One path segment, ``.`` and ``..`` included (unencoded, URL normalisation
    would turn ``participants/..`` into another path)."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def rooms_command(parser: argparse.ArgumentParser, args: list[str], env: Mapping[str, str]) -> int:
    parser.add_argument(
        "--url", default=env.get("SIGNAL_API_URL") or DEFAULT_URL,
        help=f"the server's signaling prefix (default {DEFAULT_URL}) [SIGNAL_API_URL]",
    )
    parser.add_argument("--token", help="an admin token to send instead of minting one [SIGNAL_ADMIN_TOKEN]")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every room: id, participants, created time")
    show = actions.add_parser("show", help="one room's participants")
    show.add_argument("room")
    kick = actions.add_parser("kick", help="remove a participant now (KICKED)")
    kick.add_argument("room")
    kick.add_argument("user")
    kick.add_argument("--ban", type=int, default=0, help="keep the user out of the room for SECONDS")
    close = actions.add_parser("close", help="end a room for everyone (ROOM_CLOSED)")
    close.add_argument("room")
    close.add_argument("--ban", type=int, default=0, help="keep the room closed for SECONDS")
    send = actions.add_parser("send", help="a server_message to the room, or to one participant")
    send.add_argument("room")
    send.add_argument("payload", help="a JSON object, e.g. '{\"text\": \"ending in 5 minutes\"}'")
    send.add_argument("--to", metavar="USER", help="only this participant")
    namespace = parser.parse_args(args)

    token = namespace.token or env.get("SIGNAL_ADMIN_TOKEN")
    if not token:
        try:
            settings = load_settings(vars(namespace), env, namespace.config)
        except SettingsError as exc:
            return _fail(str(exc))
        if not settings.jwt_secret or not settings.jwt_algorithm.startswith("HS"):
            return _fail("--jwt-secret: give the server's secret (to mint an admin token) or --token")
        token = mint_token_for(settings, "signal-server-cli", ttl=60, admin=True)
    base = namespace.url.rstrip("/")
    try:
        url = URL(base)
    except ValueError:
        return _fail("--url: not a URL")
    if url.user is not None or url.password is not None:
        return _fail("--url: credentials in the URL are not supported (the admin token is the credential)")
    if url.scheme not in ("http", "https") or not url.host:
        return _fail("--url: an http:// or https:// URL of the signaling prefix, e.g. " + DEFAULT_URL)
    action = namespace.action
    body: dict[str, Any] | None = None
    if action == "list":
        method, path = "GET", "/rooms"
    else:
        room = _segment(namespace.room)
        if action == "show":
            method, path = "GET", f"/rooms/{room}"
        elif action == "kick":
            method, path = "DELETE", f"/rooms/{room}/participants/{_segment(namespace.user)}"
        elif action == "close":
            method, path = "DELETE", f"/rooms/{room}"
        else:
            try:
                payload = json.loads(namespace.payload)
            except ValueError:
                return _fail("payload: not valid JSON")
            body = {"payload": payload}
            if namespace.to:
                body["target_user_id"] = namespace.to
            method, path = "POST", f"/rooms/{room}/messages"
        if action in ("kick", "close") and namespace.ban:
            path += f"?ban={namespace.ban}"
    try:
        # Encoded as built: yarl would decode %2E and drop the dot segment again.
        status, answer = asyncio.run(_request(method, URL(str(url) + path, encoded=True), token, body))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _fail(f"cannot reach {base}: {exc or type(exc).__name__}", 1)
    if 200 <= status < 300:
        print(_printable(json.dumps(answer, indent=2, ensure_ascii=False)))
        return 0
    message = answer.get("message") if isinstance(answer, dict) else None
    return _fail(f"HTTP {status}: {message or answer}", 1)


async def _request(method: str, url: URL, token: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(
            method, url, json=body, headers={"Authorization": f"Bearer {token}"}, allow_redirects=False
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text.strip()[:200]
