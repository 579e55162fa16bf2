"""``signal-server rooms ...`` against a running server (both real processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
from aiohttp import ClientSession, web

from .conftest import COMMAND, SECRET, TIMEOUT, Member, Server, make_token


async def rooms(base: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND, "rooms", "--url", f"{base}/webrtc", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", **(env if env is not None else {"SIGNAL_JWT_SECRET": SECRET})},
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 3)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_list_show_send_kick_close(start_server: Callable[..., Awaitable[Server]]) -> None:
    server = await start_server("--port", "0", "--jwt-secret", SECRET)
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    base = f"http://127.0.0.1:{port}"
    async with ClientSession() as session:
        members = []
        for user in ("alice", "bob"):
            ws = await session.ws_connect(f"{base}/webrtc/ws/room-1?token={make_token(user)}")
            members.append(Member(ws, user))
            await members[-1].expect("room_state")
        alice, bob = members
        await alice.expect("user_joined")

        code, out, _ = await rooms(base, "list")
        assert code == 0
        assert [(r["room_id"], r["participants"]) for r in json.loads(out)["rooms"]] == [("room-1", 2)]
        code, out, _ = await rooms(base, "show", "room-1")
        assert [p["user_id"] for p in json.loads(out)["participants"]] == ["alice", "bob"]

        code, out, _ = await rooms(base, "send", "room-1", '{"text": "hello"}', "--to", "alice")
        assert code == 0 and json.loads(out)["sent"] is True
        assert (await alice.expect("server_message"))["payload"] == {"text": "hello"}

        # Read while the command runs: a client that reads only after the server closed
        # the socket finds the keepalive ping before the error, and cannot answer it.
        kicked = asyncio.ensure_future(bob.expect_error("KICKED"))
        code, out, _ = await rooms(base, "kick", "room-1", "bob", "--ban", "60")
        assert code == 0 and json.loads(out)["ban"] == 60
        await kicked
        assert (await alice.expect("user_left"))["payload"]["reason"] == "kicked"

        code, out, err = await rooms(base, "kick", "room-1", "bob")
        assert code == 1 and "HTTP 404" in err and "NOT_FOUND" in err
        code, out, err = await rooms(base, "show", "bad room")
        assert code == 1 and "INVALID_ROOM" in err
        code, out, err = await rooms(base, "send", "room-1", "not json")
        assert code == 2 and "payload" in err

        closed = asyncio.ensure_future(alice.expect_error("ROOM_CLOSED"))
        code, out, _ = await rooms(base, "close", "room-1")
        assert code == 0
        await closed
        code, out, _ = await rooms(base, "list")
        assert json.loads(out) == {"rooms": []}


async def test_tokens_and_unreachable_servers(start_server: Callable[..., Awaitable[Server]]) -> None:
    server = await start_server("--port", "0", "--jwt-secret", SECRET)
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    base = f"http://127.0.0.1:{port}"
    code, _, err = await rooms(base, "list", env={})
    assert code == 2 and "--jwt-secret" in err
    code, _, err = await rooms(base, "list", env={"SIGNAL_ADMIN_TOKEN": make_token("someone")})
    assert code == 1 and "HTTP 403" in err and "FORBIDDEN" in err  # a participant's token
    minted = await asyncio.create_subprocess_exec(
        *COMMAND, "token", "--admin", "ops", "--jwt-secret", SECRET, stdout=asyncio.subprocess.PIPE
    )
    admin_token = (await asyncio.wait_for(minted.communicate(), TIMEOUT * 3))[0].decode().strip()
    assert jwt.decode(admin_token, SECRET, algorithms=["HS256"])["admin"] is True
    code, out, _ = await rooms(base, "list", env={"SIGNAL_ADMIN_TOKEN": admin_token})
    assert code == 0 and json.loads(out) == {"rooms": []}
    code, _, err = await rooms(base, "list", env={"SIGNAL_JWT_SECRET": "another-secret-that-is-long-enough-!!"})
    assert code == 1 and "HTTP 401" in err
    from .cluster import free_port

    code, _, err = await rooms(f"http://127.0.0.1:{free_port()}", "list")
    assert code == 1 and "cannot reach" in err




async def test_dot_segment_users_can_be_kicked(start_server: Callable[..., Awaitable[Server]]) -> None:
    """``.`` and ``..`` are valid user ids; unencoded, a client's URL normalisation turns
    ``participants/..`` into another path (404, or worse): the command encodes them."""
    server = await start_server("--port", "0", "--jwt-secret", SECRET)
    port = (await server.line_matching(r"listening on http://127\.0\.0\.1:(\d+)")).group(1)
    base = f"http://127.0.0.1:{port}"
    async with ClientSession() as session:
        members = []
        for user in ("alice", "..", "."):
            ws = await session.ws_connect(f"{base}/webrtc/ws/room-1?token={make_token(user)}")
            members.append(Member(ws, user))
            await members[-1].expect("room_state")
        for user in ("..", "."):
            code, out, err = await rooms(base, "kick", "room-1", user)
            assert code == 0 and json.loads(out)["user_id"] == user, err
        code, out, _ = await rooms(base, "show", "room-1")
        assert [p["user_id"] for p in json.loads(out)["participants"]] == ["alice"]


async def test_answers_cannot_drive_the_terminal(aiohttp_server: Any) -> None:
    """Whatever --url answers (a wrong host, a proxy's error page, a hostile server),
    control characters never reach the operator's terminal raw; credentials in --url
    get a one-line error, not a traceback."""
    answers = {
        "/a/rooms": web.json_response({"message": "\x1b]0;owned\x07\x1b[2J looks fine"}, status=500),
        "/b/rooms": web.Response(text="\x1b[8mhidden\x1b[0m proxy error", status=502),
        "/c/rooms": web.json_response({"rooms": [{"room_id": "r\u009b31m", "note": "\u202eevil"}]}),
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        return answers[request.path]

    app = web.Application()
    app.router.add_get("/{prefix}/rooms", answer)
    server = await aiohttp_server(app, host="127.0.0.1")
    for prefix in ("a", "b", "c"):
        process = await asyncio.create_subprocess_exec(
            *COMMAND, "rooms", "--url", f"http://127.0.0.1:{server.port}/{prefix}", "--token", "t", "list",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
        )
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 3)
        output = (out + err).decode()
        assert not any(ch in output for ch in "\x1b\x07\u009b\u202e"), repr(output)
        assert ("looks fine" in output or "proxy error" in output or "31m" in output), repr(output)
    code, _, refusal = await rooms(f"http://ops:hunter2@127.0.0.1:{server.port}/a", "list")
    assert code == 2 and "--url" in refusal and "Traceback" not in refusal and "hunter2" not in refusal, refusal
