"""The Python floor yardstick: the least an aiohttp relay can do and still be correct.

Not a product: no auth (unless --jwt-secret, for the join-storm comparison),
no validation, no limits, no metrics, no reconnection. It does only what the
wire contract makes every correct server do: room_state to the joiner,
user_joined to the others, the stamped envelope (so the load generator's
envelope checks pass), targeted and room-wide relay. It parses with orjson and
writes with ``send_frame`` on uvloop. signal-server's figures are reported as
ratios to this one.

Usage: python bench/floor.py PORT [--jwt-secret SECRET]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jwt
import orjson
import uvloop
from aiohttp import WSMsgType, web

ROOMS: web.AppKey[dict[str, dict[str, web.WebSocketResponse]]] = web.AppKey("ROOMS", dict)
SECRET: web.AppKey[str | None] = web.AppKey("SECRET", str)

_stamp: list[Any] = [-1, ""]


def timestamp() -> str:
    millis = int(time.time() * 1000)
    if millis != _stamp[0]:
        seconds, ms = divmod(millis, 1000)
        _stamp[0] = millis
        _stamp[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
    return str(_stamp[1])


async def relay(request: web.Request) -> web.WebSocketResponse:
    room_id = request.match_info["room"]
    secret = request.app[SECRET]
    if secret:
        user = jwt.decode(request.query["token"], secret, algorithms=["HS256"])["sub"]
    else:
        user = request.query["id"]
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    room = request.app[ROOMS].setdefault(room_id, {})
    room[user] = ws
    state = {"type": "room_state", "payload": {"participants": [{"user_id": u, "username": u} for u in room]}}
    await ws.send_frame(orjson.dumps(state), WSMsgType.TEXT)
    joined = orjson.dumps({"type": "user_joined", "payload": {"user_id": user, "username": user}})
    for other in list(room.values()):
        if other is not ws:
            await other.send_frame(joined, WSMsgType.TEXT)
    try:
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            data = orjson.loads(message.data)
            payload = data["payload"]
            payload["sender_id"] = user
            frame = orjson.dumps(
                {"type": data["type"], "payload": payload, "sender_id": user, "room_id": room_id,
                 "timestamp": timestamp()}
            )
            target = payload.get("target_user_id")
            if target is not None:
                peer = room.get(target)
                if peer is not None:
                    await peer.send_frame(frame, WSMsgType.TEXT)
            else:
                for other in list(room.values()):
                    if other is not ws:
                        await other.send_frame(frame, WSMsgType.TEXT)
    finally:
        if room.get(user) is ws:
            del room[user]
    return ws


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--jwt-secret")
    args = parser.parse_args()
    app = web.Application()
    app[ROOMS] = {}
    app[SECRET] = args.jwt_secret
    app.router.add_get("/ws/{room}", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
