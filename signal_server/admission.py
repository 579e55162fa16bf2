"""Connection limits: per process, per client IP (concurrent and rate), per user.

Pure bookkeeping with the clock passed in; the WebSocket handler asks before
it admits a connection and releases when the connection ends. The per-IP
rate buckets are pruned once they refill, so a scan from many addresses
cannot grow this table without bound.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping

from .errors import SignalError
from .ratelimit import TokenBucket
from .settings import Settings

__all__ = ["Admission", "ClientAddress"]

_PRUNE_THRESHOLD = 10_000


class Admission:
    """Counts open connections and refuses the ones over a limit."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.open = 0
        self._per_ip: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._ip_buckets: dict[str, TokenBucket] = {}

    def admit_address(self, address: str, now: float) -> tuple[SignalError, str] | None:
        """Count a new connection from ``address``, or say which limit refuses it.

        Returns None when admitted (call :meth:`release_address` later), else
        the error and the name of the limit (for metrics).
        """
        settings = self._settings
        if self.open >= settings.max_connections:
            return SignalError("SERVER_BUSY", "the server is at its connection limit"), "server"
        if self._per_ip[address] >= settings.max_connections_per_ip:
            return (
                SignalError(
                    "TOO_MANY_CONNECTIONS",
                    f"at most {settings.max_connections_per_ip} connections per address",
                ),
                "ip_concurrent",
            )
        bucket = self._ip_buckets.get(address)
        if bucket is None:
            if len(self._ip_buckets) >= _PRUNE_THRESHOLD:
                self._prune(now)
            bucket = self._ip_buckets[address] = TokenBucket(
                settings.ip_connect_rate, settings.ip_connect_burst, now
            )
        if not bucket.take(now):
            return (
                SignalError("TOO_MANY_CONNECTIONS", "too many new connections from this address"),
                "ip_rate",
            )
        self.open += 1
        self._per_ip[address] += 1
        return None

    def release_address(self, address: str) -> None:
        self.open -= 1
        self._per_ip[address] -= 1
        if self._per_ip[address] <= 0:
            del self._per_ip[address]

    def admit_user(self, user_id: str) -> SignalError | None:
        limit = self._settings.max_connections_per_user
        if self._per_user[user_id] >= limit:
            return SignalError("TOO_MANY_CONNECTIONS", f"at most {limit} connections per user")
        self._per_user[user_id] += 1
        return None

    def release_user(self, user_id: str) -> None:
        self._per_user[user_id] -= 1
        if self._per_user[user_id] <= 0:
            del self._per_user[user_id]

    def _prune(self, now: float) -> None:
        idle = [ip for ip, bucket in self._ip_buckets.items() if bucket.is_full(now)]
        for ip in idle:
            del self._ip_buckets[ip]


def _parse_networks(specs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(spec, strict=False) for spec in specs]


class ClientAddress:
    """Finds the client's IP: the peer, or X-Forwarded-For from a trusted proxy."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = _parse_networks(trusted)

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def __call__(self, peer: str | None, headers: Mapping[str, str]) -> str:
        address = peer or "unknown"
        if not self._is_trusted(address):
            return address
        # Walk X-Forwarded-For from the right: the first hop that is not one of
        # our proxies is the client. Anything left of it is client-controlled.
        forwarded = headers.get("X-Forwarded-For", "")
        for hop in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return address
        return address

