"""Verified-key cache: an LRU of keys whose argon2 check already passed, and a negative cache.

A hit costs one dict lookup and a constant-time comparison of SHA-256 digests: no I/O, no
argon2. Invalidation is immediate (``invalidate(key_id)``) and guards against the classic
refill race: a fill that began before an invalidation is dropped (``epoch`` check), so a
verification that read an enabled key just before it was disabled can never bring it back.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

from sidecar.gate.principal import Principal


@dataclass(frozen=True, slots=True)
class CacheEntry:
    digest: bytes
    principal: Principal


class _CountingLRU(LRUCache[str, CacheEntry]):
    def __init__(self, maxsize: int, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, CacheEntry]:
        item = super().popitem()
        self._on_evict()
        return item


class KeyCache:
    def __init__(self, size: int, negative_size: int, negative_ttl: float,
                 on_evict: Callable[[], None] = lambda: None) -> None:
        self._entries = _CountingLRU(size, on_evict)          # lookup id -> entry
        self._by_key_id: dict[str, str] = {}                  # key id -> lookup id
        self._negative: TTLCache[bytes, str] | None = (
            TTLCache(negative_size, negative_ttl, timer=time.monotonic) if negative_ttl > 0 else None
        )
        self.epoch = 0
        # key id -> the newest store revision an invalidation named (None: unknown, so any fill
        # that began before it is refused). A verification that read a record at least this new
        # may still fill the cache after an invalidation: it saw the change.
        self._invalidated: dict[str, float] = {}
        self._cleared_epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, lookup_id: str, digest: bytes) -> Principal | None:
        entry = self._entries.get(lookup_id)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry.principal

    def put(self, digest: bytes, principal: Principal, fill_epoch: int) -> bool:
        """Store a verified key unless, since ``fill_epoch``, an invalidation of this key named a
        newer record than the one verified (or the whole cache was cleared)."""
        if fill_epoch != self.epoch and (
                fill_epoch < self._cleared_epoch
                or self._invalidated.get(principal.key_id, -1) > principal.revision):
            return False
        self._entries[principal.lookup_id] = CacheEntry(digest, principal)
        self._by_key_id[principal.key_id] = principal.lookup_id
        return True

    def revision_of(self, key_id: str) -> int | None:
        """The store revision of the cached record of ``key_id``, if it is cached."""
        lookup_id = self._by_key_id.get(key_id)
        entry = self._entries.get(lookup_id) if lookup_id is not None else None
        return entry.principal.revision if entry is not None else None

    def invalidate(self, key_id: str, revision: int | None = None) -> None:
        """Forget a key now; also drops every negative result (the key may be enabled again).
        ``revision``: the store revision of the change, when known."""
        self.epoch += 1
        if len(self._invalidated) > 100_000:  # bounded: forgetting them is the cautious side
            self._invalidated.clear()
            self._cleared_epoch = self.epoch
        self._invalidated[key_id] = max(self._invalidated.get(key_id, -1),
                                        float("inf") if revision is None else revision)
        lookup_id = self._by_key_id.pop(key_id, None)
        if lookup_id is not None:
            self._entries.pop(lookup_id, None)
        if self._negative is not None:
            self._negative.clear()

    def clear(self) -> None:
        self.epoch += 1
        self._cleared_epoch = self.epoch
        self._entries.clear()
        self._by_key_id.clear()
        if self._negative is not None:
            self._negative.clear()

    def known_bad(self, digest: bytes) -> str | None:
        """Why this token failed recently (e.g. "invalid", "disabled"), or None."""
        return self._negative.get(digest) if self._negative is not None else None

    def remember_bad(self, digest: bytes, fill_epoch: int, reason: str = "invalid") -> None:
        if self._negative is not None and fill_epoch == self.epoch:
            self._negative[digest] = reason
