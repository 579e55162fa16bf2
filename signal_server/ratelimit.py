"""Token buckets and the per-connection abuse policy. Pure: clocks are passed in.

The policy is pinned by the contract: a message over the limit is dropped
with a ``RATE_LIMITED`` error sent at most once a second; a connection that
keeps exceeding for 5 s, or has 100 messages dropped within 10 s, is closed.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

__all__ = ["TokenBucket", "Verdict", "MessageRateLimiter"]


class TokenBucket:
    """Classic token bucket: ``rate`` tokens a second, at most ``burst`` saved."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = min(tokens, self.burst) - 1.0
            return True
        self.tokens = tokens
        return False

    def is_full(self, now: float) -> bool:
        """True when the bucket has refilled (its owner has been quiet)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Verdict(Enum):
    ALLOW = "allow"
    DROP_AND_REPORT = "drop_and_report"  # drop, send RATE_LIMITED (non-fatal)
    DROP = "drop"  # drop quietly: reported less than a second ago
    CLOSE = "close"  # sustained abuse: close with 4429


ALLOW = Verdict.ALLOW
SUSTAINED_SECONDS = 5.0
STREAK_GAP_SECONDS = 1.0
DROP_WINDOW_SECONDS = 10.0
DROPS_IN_WINDOW = 100
REPORT_INTERVAL_SECONDS = 1.0


class MessageRateLimiter(TokenBucket):
    """Decides, per incoming message, whether a connection is within its limit.

    The bucket arithmetic is inlined in :meth:`check` (it runs for every
    message; a method call more is measurable there).
    """

    __slots__ = ("_streak_start", "_last_drop", "_last_report", "_drops")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        super().__init__(rate, burst, now)
        self._streak_start = 0.0
        self._last_drop = -1e18
        self._last_report = -1e18
        self._drops: deque[float] | None = None  # made on the first drop: most connections never drop

    def check(self, now: float) -> Verdict:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens >= 1.0:
            burst = self.burst
            self.tokens = (tokens if tokens < burst else burst) - 1.0
            return ALLOW
        self.tokens = tokens
        # Over the limit. A streak is a run of drops with no quiet second.
        if now - self._last_drop > STREAK_GAP_SECONDS:
            self._streak_start = now
        self._last_drop = now
        drops = self._drops
        if drops is None:
            drops = self._drops = deque(maxlen=DROPS_IN_WINDOW)
        drops.append(now)
        if now - self._streak_start >= SUSTAINED_SECONDS or (
            len(drops) == DROPS_IN_WINDOW and now - drops[0] <= DROP_WINDOW_SECONDS
        ):
            return Verdict.CLOSE
        if now - self._last_report >= REPORT_INTERVAL_SECONDS:
            self._last_report = now
            return Verdict.DROP_AND_REPORT
        return Verdict.DROP
