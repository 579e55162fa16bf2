"""Counters kept as plain integers, exposed through prometheus-client at scrape time.

prometheus-client's own Counter takes a lock and a label lookup on every
``inc()``; on the relay hot path that is measurable. Here the hot path bumps
a dict entry, and a custom collector turns the numbers into Prometheus text
only when ``/metrics`` is scraped. Each app gets its own registry, so two
apps in one process (tests, embedding) never collide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .tokencache import VerifiedTokenCache

__all__ = ["Metrics", "TokenCacheCollector"]


class Metrics(Collector):
    """All the server's numbers (names are pinned in docs/protocol.md)."""

    def __init__(self, gauges: Callable[[], tuple[int, int]]) -> None:
        # ``gauges`` returns (connections, rooms) from the live state, so the
        # gauges can never drift from what the hub actually holds.
        self._gauges = gauges
        self.relayed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.limit_closes: Counter[str] = Counter()
        self.joins = 0
        self.resumes = 0
        self.rate_limited = 0
        self.kept_overflows = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def limit_close(self, reason: str) -> None:
        """A connection closed by a limit (the peer's ``on_limit``); a byte-rate cut-off is also an error sent."""
        self.limit_closes[reason] += 1
        if reason == "byte_rate":
            self.errors["RATE_LIMITED"] += 1

    def collect(self) -> Iterator[Metric]:
        connections, rooms = self._gauges()
        yield GaugeMetricFamily("signal_connections", "Open signaling WebSockets", value=connections)
        yield GaugeMetricFamily("signal_rooms", "Rooms with at least one participant", value=rooms)
        yield _counter("signal_joins", "Joins (resumes included)", self.joins)
        yield _counter("signal_resumes", "Joins that resumed a held slot", self.resumes)
        yield _labelled("signal_messages_relayed", "Messages relayed by type", "type", self.relayed)
        yield _labelled("signal_errors", "Error messages sent by code", "code", self.errors)
        yield _labelled("signal_leaves", "Participants that left, by reason", "reason", self.leaves)
        yield _labelled(
            "signal_connections_refused",
            "Connections refused by a connection limit, by limit",
            "limit",
            self.refused,
        )
        yield _labelled(
            "signal_limit_closes",
            "Connections closed by a limit (rate_limit, slow_consumer, message_too_large)",
            "reason",
            self.limit_closes,
        )
        yield _counter(
            "signal_rate_limited_messages", "Messages dropped by the per-connection rate limit",
            self.rate_limited,
        )
        yield _counter(
            "signal_kept_overflows", "Held slots whose kept-message buffer overflowed",
            self.kept_overflows,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class TokenCacheCollector(Collector):
    """The verified-token cache's hits, misses, flushes, entries and bytes, read at scrape time
    (the join path only bumps the cache's own integers)."""

    def __init__(self, cache: VerifiedTokenCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        yield _counter("signal_token_cache_hits", "Tokens served from the verified-token cache", cache.hits)
        yield _counter(
            "signal_token_cache_misses", "Tokens the cache could not serve (verified in full)", cache.misses
        )
        yield _counter("signal_token_cache_flushes", "Cache flushes: the key or the claims changed", cache.flushes)
        yield GaugeMetricFamily("signal_token_cache_entries", "Tokens in the verified-token cache", value=len(cache))
        yield GaugeMetricFamily(
            "signal_token_cache_bytes", "Estimated memory of the verified-token cache", value=cache.size_bytes
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(name: str, documentation: str, label: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
