"""The verified-key cache: digest-checked hits, immediate invalidation, the refill race, the
negative cache and the LRU bound."""

from __future__ import annotations

from datetime import UTC, datetime

from sidecar.gate.cache import KeyCache
from sidecar.gate.principal import Principal
from sidecar.keys.format import generate_key
from sidecar.keys.records import ENABLED, KeyRecord
from sidecar.settings import settings_from_mapping

SETTINGS = settings_from_mapping({}, {})


def _principal(n: int, lookup_id: str) -> Principal:
    record = KeyRecord(id=f"key_{n}", lookup_id=lookup_id, name=f"k{n}", roles=("viewer",), workspace="acme",
                       status=ENABLED, created_at=datetime.now(UTC), created_by="test", key_hash="h")
    return Principal.from_record(record, SETTINGS)


def _entry(n: int) -> tuple[bytes, Principal]:
    key = generate_key()
    return key.digest, _principal(n, key.lookup_id)


def test_hit_needs_the_same_digest() -> None:
    cache = KeyCache(10, 10, 60)
    digest, principal = _entry(1)
    assert cache.get(principal.lookup_id, digest) is None
    assert cache.put(digest, principal, cache.epoch)
    assert cache.get(principal.lookup_id, digest) is principal
    wrong = generate_key(principal.lookup_id).digest  # same lookup id, other secret
    assert cache.get(principal.lookup_id, wrong) is None
    assert len(cache) == 1


def test_invalidate_forgets_the_key_at_once() -> None:
    cache = KeyCache(10, 10, 60)
    digest, principal = _entry(1)
    other_digest, other = _entry(2)
    cache.put(digest, principal, cache.epoch)
    cache.put(other_digest, other, cache.epoch)
    cache.invalidate(principal.key_id)
    assert cache.get(principal.lookup_id, digest) is None
    assert cache.get(other.lookup_id, other_digest) is other
    cache.invalidate("key_unknown")  # harmless
    assert len(cache) == 1


def test_fill_that_started_before_an_invalidation_is_dropped() -> None:
    cache = KeyCache(10, 10, 60)
    digest, principal = _entry(1)
    epoch = cache.epoch          # verification starts and reads an enabled key...
    cache.invalidate(principal.key_id)  # ...the key is disabled meanwhile...
    assert not cache.put(digest, principal, epoch)  # ...so its result must not be cached
    assert cache.get(principal.lookup_id, digest) is None


def test_negative_results_are_remembered_and_cleared_by_any_invalidation() -> None:
    cache = KeyCache(10, 10, 60)
    digest, _ = _entry(1)
    assert cache.known_bad(digest) is None
    cache.remember_bad(digest, cache.epoch)
    assert cache.known_bad(digest) is not None
    cache.invalidate("key_other")  # e.g. a key was enabled: yesterday's "disabled" may be stale
    assert cache.known_bad(digest) is None
    stale = cache.epoch - 1
    cache.remember_bad(digest, stale)
    assert cache.known_bad(digest) is None


def test_negative_cache_can_be_turned_off() -> None:
    cache = KeyCache(10, 10, 0)
    digest, _ = _entry(1)
    cache.remember_bad(digest, cache.epoch)
    assert cache.known_bad(digest) is None


def test_lru_bound_evicts_the_least_recently_used_and_counts_it() -> None:
    evictions: list[int] = []
    cache = KeyCache(2, 10, 60, on_evict=lambda: evictions.append(1))
    entries = [_entry(n) for n in range(3)]
    cache.put(*entries[0], cache.epoch)
    cache.put(*entries[1], cache.epoch)
    assert cache.get(entries[0][1].lookup_id, entries[0][0]) is not None  # 0 is now the most recent
    cache.put(*entries[2], cache.epoch)
    assert len(cache) == 2
    assert evictions == [1]
    assert cache.get(entries[1][1].lookup_id, entries[1][0]) is None
    assert cache.get(entries[0][1].lookup_id, entries[0][0]) is not None


def test_clear_empties_everything_and_moves_the_epoch() -> None:
    cache = KeyCache(10, 10, 60)
    digest, principal = _entry(1)
    epoch = cache.epoch
    cache.put(digest, principal, epoch)
    cache.remember_bad(b"x" * 32, epoch)
    cache.clear()
    assert len(cache) == 0
    assert cache.known_bad(b"x" * 32) is None
    assert cache.epoch != epoch
