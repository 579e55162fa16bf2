"""Waiting for delivery receipts: the pongs that confirm what a client read (see signal_server/peer.py)."""

from __future__ import annotations

import asyncio

import pytest

from signal_server.peer import WebSocketPeer

__all__ = ["confirmations", "fully_confirmed"]


def confirmations(monkeypatch: pytest.MonkeyPatch, peer: WebSocketPeer, count: int) -> asyncio.Event:
    """An event set once ``peer`` has taken ``count`` pongs that answer our pings."""
    event = asyncio.Event()
    taken = 0
    original = WebSocketPeer.take_pong

    def take_pong(self: WebSocketPeer, data: bytes) -> bool:
        nonlocal taken
        answered = original(self, data)
        if self is peer and answered:
            taken += 1
            if taken >= count:
                event.set()
        return answered

    monkeypatch.setattr(WebSocketPeer, "take_pong", take_pong)
    return event


def fully_confirmed(monkeypatch: pytest.MonkeyPatch, peer: WebSocketPeer) -> asyncio.Event:
    """An event set once the client has confirmed every message sent to ``peer`` so far."""
    event = asyncio.Event()
    original = WebSocketPeer.take_pong

    def take_pong(self: WebSocketPeer, data: bytes) -> bool:
        answered = original(self, data)
        if self is peer and not peer.unconfirmed:
            event.set()
        return answered

    monkeypatch.setattr(WebSocketPeer, "take_pong", take_pong)
    if not peer.unconfirmed:
        event.set()
    return event
