"""Token buckets for failed authentications, per client address and per lookup id (docs/reference/headers.md).

Only failures spend tokens, so valid traffic never pays; memory is bounded by an LRU of
buckets. A full bucket holds one minute's allowance and refills continuously.
"""

from __future__ import annotations

import math
import time

from cachetools import LRUCache


class FailureLimiter:
    def __init__(self, per_minute: int, max_tracked: int = 100_000) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(max_tracked)  # tokens, stamp

    def _level(self, subject: str, now: float) -> float:
        state = self._buckets.get(subject)
        if state is None:
            return self._capacity
        tokens, stamp = state
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def retry_after(self, subject: str) -> int | None:
        """Seconds until one more attempt is allowed, or None when allowed now."""
        level = self._level(subject, time.monotonic())
        if level >= 1.0:
            return None
        return max(1, math.ceil((1.0 - level) / self._rate))

    def record_failure(self, subject: str) -> None:
        now = time.monotonic()
        self._buckets[subject] = (max(0.0, self._level(subject, now) - 1.0), now)

    def forget(self, subject: str) -> None:
        self._buckets.pop(subject, None)

    def refund(self, subject: str) -> None:
        """Give back one unit taken by :meth:`record_failure` (a held attempt that succeeded)."""
        now = time.monotonic()
        self._buckets[subject] = (min(self._capacity, self._level(subject, now) + 1.0), now)
