"""Requests in flight per key, so that a disable or an expiry cuts a key's open streams within a
second and shutdown can wait for them to drain."""

from __future__ import annotations

import asyncio
import time


class StreamRegistry:
    """In-flight proxied requests per key id, so that disabling a key can cut its open streams
    (docs/reference/keys.md: within 1 s) and shutdown can wait for them to drain."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[asyncio.Task[object]]] = {}
        self.cut_tasks: set[asyncio.Task[object]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._count = 0
        # key id -> when it was last cut (perf_counter): a request whose authentication began
        # before that moment must not start forwarding afterwards (see was_cut_since).
        self._cut_at: dict[str, float] = {}
        # key id -> the timer that cuts its requests when the key expires (one per key with
        # requests in flight): an expired key's open stream ends within 1 s of expires_at,
        # as a disabled key's does.
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key_id: str, task: asyncio.Task[object], deadline: float | None = None) -> None:
        """Track ``task`` as in flight for ``key_id``; ``deadline`` (epoch seconds) is when the
        key stops authenticating (expiry or scheduled disable): its requests are cut then."""
        tasks = self._by_key.get(key_id)
        if tasks is None:
            tasks = self._by_key[key_id] = set()
        tasks.add(task)
        self._count += 1
        self.idle.clear()
        if deadline is not None and key_id not in self._expiry_timers:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - time.time())
            self._expiry_timers[key_id] = loop.call_at(loop.time() + delay, self._expired, key_id)

    def _expired(self, key_id: str) -> None:
        self._expiry_timers.pop(key_id, None)
        self.cut(key_id)

    def discard(self, key_id: str, task: asyncio.Task[object]) -> None:
        tasks = self._by_key.get(key_id)
        if tasks is not None and task in tasks:
            tasks.discard(task)
            self._count -= 1
            if not tasks:
                del self._by_key[key_id]
                timer = self._expiry_timers.pop(key_id, None)
                if timer is not None:
                    timer.cancel()
            if self._count == 0:
                self.idle.set()
        self.cut_tasks.discard(task)

    def in_flight(self, key_id: str) -> int:
        """Requests of ``key_id`` in flight now (open streams included)."""
        tasks = self._by_key.get(key_id)
        return len(tasks) if tasks is not None else 0

    def __len__(self) -> int:
        return self._count

    def cut(self, key_id: str) -> int:
        """Cancel every in-flight request of ``key_id``; returns how many."""
        now = time.perf_counter()
        if len(self._cut_at) > 10_000:
            self._cut_at = {k: t for k, t in self._cut_at.items() if now - t < 60}
        self._cut_at[key_id] = now
        tasks = list(self._by_key.get(key_id, ()))
        for task in tasks:
            self.cut_tasks.add(task)
            task.cancel()
        return len(tasks)

    def was_cut_since(self, key_id: str, moment: float) -> bool:
        """Was ``key_id`` cut at or after ``moment`` (a perf_counter reading)?"""
        at = self._cut_at.get(key_id)
        return at is not None and at >= moment

    def uncut(self, key_id: str) -> None:
        """The key is usable again (enabled): forget its last cut."""
        self._cut_at.pop(key_id, None)

    def cut_all(self) -> int:
        return sum(self.cut(key_id) for key_id in list(self._by_key))
