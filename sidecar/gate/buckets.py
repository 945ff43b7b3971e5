"""Failure budgets (docs/reference/status-codes.md, 429 ``rate_limited``): token buckets spent by
failed authentications, never by valid ones.

Three budgets, each a token bucket that holds one minute's allowance and refills continuously:

* per client network (an IPv4 address, an IPv6 /64: one host usually holds a whole /64, RFC 4291
  2.5.4 and RFC 7421), across every lookup id;
* per (lookup id, client network): the guesses one network may make at one key's secret;
* per lookup id, from every network together: a larger cap on argon2 work spent on one key's
  wrong secrets. A network with no failure against that lookup id in the last minute is not
  held to it: it cannot be told from the key's holder, and refusing it would let anyone who
  knows a lookup id (it is in every key's prefix) lock the holder out. Each network is still
  held to its own two budgets.

Attempts being verified *hold* a unit of each budget they would spend, so N concurrent wrong
guesses cannot all pass the check before the first failure is recorded. A hold never refuses
anyone: an attempt that finds the budget full of holds waits for one to be released (a
success gives its unit back, a failure spends it) and is then checked again. Only recorded
failures answer 429. Memory is bounded by LRUs; holds exist only while verifications run.
"""

from __future__ import annotations

import ipaddress
import math
import time

from cachetools import LRUCache

# A network is "fresh" for a lookup id (exempt from its global cap) when it has had no failure
# against it for this long: beyond the cap, one guess per network per minute.
FRESH_SECONDS = 60.0


def client_network(address: str) -> str:
    """The budget subject for a client address: the address itself for IPv4 (and IPv4-mapped
    IPv6), its /64 for IPv6; anything unparsable as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """One token bucket per subject; only :meth:`record_failure` spends."""

    def __init__(self, per_minute: int, max_tracked: int = 100_000) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        # subject -> (tokens, stamp, time of the last failure)
        self._buckets: LRUCache[str, tuple[float, float, float]] = LRUCache(max_tracked)

    def level(self, subject: str, now: float) -> float:
        state = self._buckets.get(subject)
        if state is None:
            return self._capacity
        tokens, stamp, _ = state
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def retry_after(self, subject: str, now: float | None = None) -> int | None:
        """Seconds until one more attempt is allowed, or None when allowed now."""
        level = self.level(subject, time.monotonic() if now is None else now)
        if level >= 1.0:
            return None
        return max(1, math.ceil((1.0 - level) / self._rate))

    def failed_since(self, subject: str, since: float) -> bool:
        state = self._buckets.get(subject)
        return state is not None and state[2] >= since

    def record_failure(self, subject: str) -> None:
        now = time.monotonic()
        self._buckets[subject] = (max(0.0, self.level(subject, now) - 1.0), now, now)

    def forget(self, subject: str) -> bool:
        """Drop ``subject``'s bucket; whether it had one."""
        return self._buckets.pop(subject, None) is not None

    def forget_prefix(self, prefix: str) -> None:
        for subject in [s for s in self._buckets if s.startswith(prefix)]:
            del self._buckets[subject]


def _pair(lookup_id: str, network: str) -> str:
    # Lookup ids are base62 and networks hold no space: the pair cannot be ambiguous.
    return f"{lookup_id} {network}"


class FailureBudgets:
    """The three budgets together, with the units held by verifications in progress."""

    def __init__(self, per_address: int, per_lookup_and_network: int, per_lookup: int,
                 max_tracked: int = 100_000) -> None:
        self._by_network = FailureLimiter(per_address, max_tracked)
        self._by_pair = FailureLimiter(per_lookup_and_network, max_tracked)
        self._by_lookup = FailureLimiter(per_lookup, max_tracked)
        # Units held by verifications in progress, per subject of each limiter (no entry at 0).
        self._held_network: dict[str, int] = {}
        self._held_pair: dict[str, int] = {}
        self._held_lookup: dict[str, int] = {}

    def _fresh(self, pair: str, now: float) -> bool:
        return pair not in self._held_pair and not self._by_pair.failed_since(pair, now - FRESH_SECONDS)

    def refusal(self, network: str, lookup_id: str | None) -> int | None:
        """Seconds to wait when recorded failures refuse an attempt from ``network`` (at
        ``lookup_id``'s secret, if any), or None. Holds are not failures: they never refuse."""
        now = time.monotonic()
        wait = self._by_network.retry_after(network, now)
        if wait is not None or lookup_id is None:
            return wait
        pair = _pair(lookup_id, network)
        wait = self._by_pair.retry_after(pair, now)
        if wait is not None:
            return wait
        wait = self._by_lookup.retry_after(lookup_id, now)
        if wait is not None and not self._fresh(pair, now):
            return wait
        return None

    def try_hold(self, network: str, lookup_id: str) -> bool:
        """Hold one unit of each budget an attempt at ``lookup_id``'s secret from ``network``
        would spend; False (nothing held) when held units leave no room: wait and ask again."""
        now = time.monotonic()
        pair = _pair(lookup_id, network)
        if self._by_network.level(network, now) - self._held_network.get(network, 0) < 1.0:
            return False
        if self._by_pair.level(pair, now) - self._held_pair.get(pair, 0) < 1.0:
            return False
        if (self._by_lookup.level(lookup_id, now) - self._held_lookup.get(lookup_id, 0) < 1.0
                and not self._fresh(pair, now)):
            return False
        for held, subject in ((self._held_network, network), (self._held_pair, pair),
                              (self._held_lookup, lookup_id)):
            held[subject] = held.get(subject, 0) + 1
        return True

    def release(self, network: str, lookup_id: str, *, failed: bool) -> None:
        """Give back what :meth:`try_hold` took; a failed attempt spends it instead, in the same
        step, so no other attempt can slip in between."""
        pair = _pair(lookup_id, network)
        for held, subject in ((self._held_network, network), (self._held_pair, pair),
                              (self._held_lookup, lookup_id)):
            count = held.get(subject, 0) - 1
            if count > 0:
                held[subject] = count
            else:
                held.pop(subject, None)
        if failed:
            self.record_failure(network, lookup_id)

    def record_failure(self, network: str, lookup_id: str | None) -> None:
        """A failed attempt from ``network``; with ``lookup_id``, one that guessed at its secret."""
        self._by_network.record_failure(network)
        if lookup_id is not None:
            self._by_pair.record_failure(_pair(lookup_id, network))
            self._by_lookup.record_failure(lookup_id)

    def forget(self, lookup_id: str) -> None:
        """Forget every failure against ``lookup_id`` (its key was just enabled again). Every
        change to an enabled key lands here (a new key, a new rate limit), nearly always for a
        lookup id with no failures: only one that has some costs the scan of the pairs."""
        if self._by_lookup.forget(lookup_id):
            self._by_pair.forget_prefix(lookup_id + " ")
