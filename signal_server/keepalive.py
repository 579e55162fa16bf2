"""Dead-peer detection for every connection of an app, in one periodic sweep.

aiohttp's per-connection heartbeat re-arms a callback on every chunk of data
received, which costs about 7% of the relay's instructions per message here.
Instead the handler stamps ``peer.last_seen`` (it reads the clock for the rate
limiter anyway) and this sweep, every half interval, pings peers that have
been silent for half an interval and drops those silent for one and a half. A
live peer so has at least half an interval to answer a ping, and a dead one is
found within twice the interval, as the contract says. A peer with relayed
frames it has not confirmed is pinged on every sweep too: its pong is what
lets a later resume say ``recovered: true`` (see peer.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["Pingable", "sweep", "keep_alive"]


class Pingable(Protocol):
    last_seen: float

    @property
    def unconfirmed(self) -> bool: ...

    def ping(self) -> None: ...

    def abort(self) -> None: ...


def sweep(peers: Iterable[Pingable], now: float, interval: float) -> None:
    """Ping the quiet, drop the silent. Pure apart from the peers' own methods."""
    for peer in list(peers):
        silence = now - peer.last_seen
        if silence >= 1.5 * interval:
            peer.abort()  # the handler sees the transport lost: the grace path
        elif silence >= 0.5 * interval or peer.unconfirmed:
            peer.ping()


async def keep_alive(
    peers: Iterable[Pingable], interval: float, clock: Callable[[], float] = time.monotonic
) -> None:
    """Run :func:`sweep` every half interval until cancelled."""
    while True:
        await asyncio.sleep(interval / 2)
        sweep(peers, clock(), interval)
