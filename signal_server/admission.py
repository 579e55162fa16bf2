"""Connection limits: per process, per client IP (concurrent and rate), per user.

Pure bookkeeping with the clock passed in; the WebSocket handler asks before
it admits a connection and releases when the connection ends. Every socket
counts from its upgrade to its end, refused ones too: a refused client that
lingers in the closing handshake still holds a descriptor. The per-IP rate
buckets are pruned once they refill, so a scan from many addresses cannot
grow this table without bound.

Per-IP limits are keyed on the client's address as :class:`ClientAddress`
finds it: IPv4 addresses as they are, IPv6 addresses by their /64 (one
subscriber's whole allocation, which an attacker can otherwise walk through
for fresh limits).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

from multidict import MultiMapping

from .errors import SignalError
from .ratelimit import TokenBucket
from .settings import Settings

__all__ = ["Admission", "ClientAddress", "PER_ADDRESS", "limit_key", "parse_hop"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PRUNE_THRESHOLD = 10_000
PER_ADDRESS = frozenset({"ip_concurrent", "ip_rate"})  # limits that belong to one address


class Admission:
    """Counts open connections and refuses the ones over a limit."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.open = 0
        self._per_ip: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._ip_buckets: dict[str, TokenBucket] = {}

    def admit_address(self, address: str, now: float) -> tuple[SignalError, str] | None:
        """Count a new socket from ``address`` and say which limit, if any, refuses it.

        The socket is counted either way (call :meth:`release_address` with
        the same refusal when it ends): a refused one stays open while its
        close completes. One refused by its address's own limits counts
        against that address only, so one address's refusals cannot fill the
        process for everyone. Returns None when admitted, else the error and
        the name of the limit (for metrics).
        """
        refusal = self._check_address(address, now)
        if refusal is None or refusal[1] not in PER_ADDRESS:
            self.open += 1
        self._per_ip[address] += 1
        return refusal

    def _check_address(self, address: str, now: float) -> tuple[SignalError, str] | None:
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
        return None

    def release_address(self, address: str, refusal: tuple[SignalError, str] | None = None) -> None:
        if refusal is None or refusal[1] not in PER_ADDRESS:
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


def parse_hop(text: str) -> IPAddress | None:
    """An address as proxies write it: ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]:80``.

    Returns None for anything else (``unknown``, an obfuscated RFC 7239 name, garbage).
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not _is_port(text[end + 1:])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two or more colons
        text, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return len(text) > 1 and text[0] == ":" and text[1:].isascii() and text[1:].isdigit()


def limit_key(address: IPAddress) -> str:
    """What per-IP limits count on: an IPv4 address, or an IPv6 address's /64."""
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


class ClientAddress:
    """Finds the client's limit key: the peer's, or X-Forwarded-For's from trusted proxies.

    Every ``X-Forwarded-For`` line counts, in order, as one list (HAProxy's
    ``option forwardfor`` adds a line of its own rather than extending the
    client's). The list is walked from the right over our own proxies; the
    first hop that is not one of them is the client, and everything left of
    it is the client's own writing. A hop that cannot be read ends the walk
    too: the nearest proxy then answers for the client, so garbage can never
    mint a fresh key.
    """

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = _parse_networks(trusted)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (the socket's address) is one of the trusted proxies."""
        address = parse_hop(peer) if peer and self._trusted else None
        return address is not None and self._is_trusted(address)

    def scheme(self, peer: str | None, headers: MultiMapping[str], own: str) -> str:
        """The scheme the client used: ``X-Forwarded-Proto`` from a trusted proxy, else ``own``.

        Only the nearest proxy's word counts (the last value), and only http or https.
        """
        address = parse_hop(peer) if peer else None
        if address is None or not self._trusted or not self._is_trusted(address):
            return own
        values = [v.strip().lower() for line in headers.getall("X-Forwarded-Proto", ()) for v in line.split(",")]
        if values and values[-1] in ("http", "https"):
            return values[-1]
        return own

    def __call__(self, peer: str | None, headers: MultiMapping[str]) -> str:
        if not self._trusted and peer and ":" not in peer:
            return peer  # the socket's own IPv4 text is canonical: skip parsing on every join
        address = parse_hop(peer) if peer else None
        if address is None:
            return "unknown"  # not an IP socket (a Unix socket, say): one shared key
        if not self._trusted or not self._is_trusted(address):
            return limit_key(address)
        hops = [hop for line in headers.getall("X-Forwarded-For", ()) for hop in line.split(",")]
        for text in reversed(hops):
            if not text.strip():
                continue
            hop = parse_hop(text)
            if hop is None:
                break
            address = hop
            if not self._is_trusted(hop):
                break
        return limit_key(address)
