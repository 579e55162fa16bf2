"""Log lines that tell the operator which option a refusal points at.

A refused page origin, an ``X-Forwarded-For`` from a peer that is not a
trusted proxy, a per-IP limit reached: the client only sees its error (or, for a CORS
refusal, nothing it can read), so without these the operator cannot tell from
the logs why users fail. Clients choose the keys (any ``Origin``, any peer
address), so each key is logged at most once per interval, the table of keys
is bounded, and lines about keys not seen before share one small budget: a
flood of made-up origins costs a few lines, not a line per request.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from .ratelimit import TokenBucket

__all__ = ["Hints", "OncePerKey"]

logger = logging.getLogger(__name__)

_SHOWN = 100  # characters of a client-chosen value that make it into a line


class OncePerKey:
    """Says whether a line about ``key`` is due: once per ``interval`` seconds, within a shared budget."""

    def __init__(
        self, now: float, *, interval: float = 3600.0, max_keys: int = 1024, burst: int = 10, rate: float = 0.2,
    ) -> None:
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._budget = TokenBucket(rate, burst, now)

    def due(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        if not self._budget.take(now):
            return False
        if len(self._last) >= self._max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self._interval}
            if len(self._last) >= self._max_keys:  # all recent: forget them rather than grow
                self._last.clear()
        self._last[key] = now
        return True


def _shown(value: str) -> str:
    return repr(value[:_SHOWN] + ("..." if len(value) > _SHOWN else ""))


def _looks_like_a_proxy(address: str) -> bool:
    """A loopback or private address: where a reverse proxy on the same host or network connects from."""
    try:
        ip = ipaddress.ip_network(address, strict=False).network_address
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private


class Hints:
    """The operator hints of one signaling app."""

    def __init__(self, trusts_proxies: bool) -> None:
        now = time.monotonic()
        self._trusts_proxies = trusts_proxies
        self._origins = OncePerKey(now)
        self._forwarders = OncePerKey(now)
        self._per_ip = OncePerKey(now)

    def refused_origin(self, origin: str, where: str) -> None:
        """A request (``where``: a CORS fetch or a WebSocket) came from a page whose origin is not allowed."""
        # Keyed on what is shown: an 8 KiB Origin must not cost 8 KiB of table.
        if self._origins.due(origin[:_SHOWN], time.monotonic()):
            logger.warning(
                "origin %s refused (%s): it is not in --allowed-origin; if that page is yours, add it "
                "with --allowed-origin (logged once an hour per origin)", _shown(origin), where,
            )

    def untrusted_forwarding(self, peer: str) -> None:
        """A request from ``peer`` carries X-Forwarded-For or Forwarded, and ``peer`` is not a trusted proxy."""
        if self._forwarders.due(peer[:_SHOWN], time.monotonic()):
            logger.warning(
                "X-Forwarded-For/Forwarded from %s ignored: it is not a --trusted-proxy, so per-IP limits count "
                "every client behind it as %s; if this is your reverse proxy, add --trusted-proxy %s "
                "(logged once an hour per address)", _shown(peer), _shown(peer), peer[:_SHOWN],
            )

    def proxy_hint(self, address: str) -> str:
        """What a per-IP refusal adds to its message: a pointer to --trusted-proxy when the counted
        address looks like a proxy's and no proxy is trusted; else nothing."""
        if self._trusts_proxies or not _looks_like_a_proxy(address):
            return ""
        return " (all clients of a reverse proxy count as its address unless the server has --trusted-proxy)"

    def per_ip_refusal(self, address: str, message: str) -> None:
        if self._per_ip.due(address, time.monotonic()):
            logger.warning("refused a connection from %s: %s (logged once an hour per address)", address, message)
