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

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, lookup_id: str, digest: bytes) -> Principal | None:
        entry = self._entries.get(lookup_id)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry.principal

    def put(self, digest: bytes, principal: Principal, fill_epoch: int) -> bool:
        """Store a verified key unless an invalidation happened since ``fill_epoch``."""
        if fill_epoch != self.epoch:
            return False
        self._entries[principal.lookup_id] = CacheEntry(digest, principal)
        self._by_key_id[principal.key_id] = principal.lookup_id
        return True

    def invalidate(self, key_id: str) -> None:
        """Forget a key now; also drops every negative result (the key may be enabled again)."""
        self.epoch += 1
        lookup_id = self._by_key_id.pop(key_id, None)
        if lookup_id is not None:
            self._entries.pop(lookup_id, None)
        if self._negative is not None:
            self._negative.clear()

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._by_key_id.clear()
        if self._negative is not None:
            self._negative.clear()

    def known_bad(self, digest: bytes) -> str | None:
        """Why this token failed recently (e.g. "invalid", "disabled"), or None."""
        return self._negative.get(digest) if self._negative is not None else None

    def is_known_bad(self, digest: bytes) -> bool:
        return self.known_bad(digest) is not None

    def remember_bad(self, digest: bytes, fill_epoch: int, reason: str = "invalid") -> None:
        if self._negative is not None and fill_epoch == self.epoch:
            self._negative[digest] = reason
