"""An app backend's webhook endpoint, as the tests run it: a real aiohttp server on 127.0.0.1.

It checks every request with the package's own ``signal_server.webhooks.verify``
(a bad signature is answered 400 and never counted as an event), and can
answer 500, hang, or redirect, to exercise the sender's retries.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from signal_server.webhooks import WebhookVerificationError, verify

from .conftest import TIMEOUT

__all__ = ["Receiver", "WEBHOOK_SECRET", "summary"]

WEBHOOK_SECRET = "webhook-secret-that-is-at-least-32-bytes"


class Receiver:
    """Collects verified events in arrival order; ``mode`` decides the answer."""

    def __init__(self, secret: str = WEBHOOK_SECRET) -> None:
        self.secret = secret
        self.events: list[dict[str, Any]] = []
        self.attempts: list[str] = []  # event ids of every request, failed answers included
        self.rejected = 0
        self.mode = "ok"  # ok, error (500), hang, redirect
        self.fail_first = 0  # answer 500 to this many requests first
        self.redirect_to = ""
        self._arrived = asyncio.Event()
        self._release = asyncio.Event()
        self.server: TestServer | None = None
        self._taken = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        self._release.set()
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/hooks?token=receiver-side-token"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            event = verify(body, request.headers.get("Signal-Signature", ""), self.secret)
        except WebhookVerificationError:
            self.rejected += 1
            return web.Response(status=400)
        self.attempts.append(event["id"])
        self._arrived.set()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        if self.mode == "error":
            return web.Response(status=500)
        if self.mode == "hang":
            await self._release.wait()
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=204)  # the sender is gone: it never heard the answer
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        self.events.append(event)
        self._arrived.set()
        return web.Response(status=204)

    def release(self) -> None:
        """Answer the held requests, and every later one, at once."""
        self.mode = "ok"
        self._release.set()

    async def wait_unique(self, count: int, timeout: float = TIMEOUT * 4) -> list[dict[str, Any]]:
        """Wait until ``count`` distinct event ids were answered; the first copy of each, in arrival order."""
        async with asyncio.timeout(timeout):
            while True:
                first: dict[str, dict[str, Any]] = {}
                for event in self.events:
                    first.setdefault(event["id"], event)
                if len(first) >= count:
                    return list(first.values())
                self._arrived.clear()
                await self._arrived.wait()

    async def take(self, count: int, timeout: float = TIMEOUT * 2) -> list[dict[str, Any]]:
        """Wait until ``count`` events past the ones already taken have arrived; return them."""
        start = self._taken
        async with asyncio.timeout(timeout):
            while len(self.events) < start + count:
                self._arrived.clear()
                await self._arrived.wait()
        self._taken = start + count
        return self.events[start:start + count]

    async def wait_attempts(self, count: int, timeout: float = TIMEOUT * 3) -> None:
        async with asyncio.timeout(timeout):
            while len(self.attempts) < count:
                self._arrived.clear()
                await self._arrived.wait()


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str | None, str | None]]:
    """(event, room, user, reason) of each event: what a sequence assertion compares."""
    out = []
    for event in events:
        participant = event.get("participant") or {}
        out.append((event["event"], event["room_id"], participant.get("user_id"), participant.get("reason")))
    return out
