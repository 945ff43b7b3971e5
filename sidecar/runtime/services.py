"""The composition root: :class:`Services` builds everything from settings.

The proxy app (public listener, served by ``sidecar.http.server``) and the admin app (an aiohttp
application on the admin listener) share one :class:`Services`: store, caches, signer, metrics,
the upstream connection pool, the stream registry and background tasks. Each listener acquires
it while it runs, so the first one started opens it and the last one stopped closes it,
whatever the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.gate.authenticator import Authenticator, LastUsed
from sidecar.gate.cache import KeyCache
from sidecar.gate.peers import ClientRequest
from sidecar.gate.sessions import SessionBindings
from sidecar.http.client import UpstreamPool
from sidecar.keys.audit import KEY_EXPIRED, AuditLog
from sidecar.keys.format import KeyHasher
from sidecar.keys.manager import KeyManager, run_scheduled_disables
from sidecar.keys.records import DISABLED, KeyRecord, to_rfc3339, utcnow
from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.sqlite import SQLiteKeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.proxy.assertion import Signer, load_signing_keys
from sidecar.proxy.handler import ProxyHandler
from sidecar.proxy.streams import StreamRegistry
from sidecar.settings import Settings


class Services:
    def __init__(self, settings: Settings, *, log: JsonLog | None = None,
                 registry: CollectorRegistry | None = None, store: KeyStore | None = None) -> None:
        self.settings = settings
        self.log = log or JsonLog(level=settings.log_level)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.store: KeyStore = store or SQLiteKeyStore(settings.database_path)
        self.hasher = KeyHasher(settings.argon2)
        self.cache = KeyCache(settings.auth.cache_size, settings.auth.negative_cache_size,
                              settings.auth.negative_cache_ttl_seconds,
                              on_evict=self.metrics.cache_evictions.inc)
        self.audit = AuditLog(self.store, self.log, self.metrics, settings.workspace)
        self.last_used = LastUsed()
        self.streams = StreamRegistry()
        self.bindings = SessionBindings(self.store, settings.proxy.session_binding_max,
                                        settings.proxy.session_binding_ttl_seconds)
        self.keys = KeyManager(settings, self.store, self.hasher, self.audit, on_change=self.key_changed)
        self.signer: Signer | None = None
        self.pool: UpstreamPool | None = None
        self.authenticator: Authenticator | None = None
        self.proxy: ProxyHandler | None = None
        self.draining = False
        self._users = 0
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._revision = 0
        self._marker = 0
        self._next_prune = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def acquire(self) -> None:
        async with self._lock:
            self._users += 1
            if self._users == 1:
                await self._open()

    async def release(self) -> None:
        async with self._lock:
            self._users -= 1
            if self._users == 0:
                await self._close()

    async def _open(self) -> None:
        settings = self.settings
        self.signer = Signer(load_signing_keys(settings.signing, settings.data_dir), settings.signing)
        await self.store.open()
        self._revision, _ = await self.store.changes_since(1 << 62)
        self._marker = await self.store.external_change_marker()
        proxy = settings.proxy
        self.pool = UpstreamPool(proxy.upstream, max_connections=proxy.upstream_max_connections,
                                 pool_timeout=proxy.upstream_pool_timeout_seconds,
                                 connect_timeout=proxy.upstream_timeout_seconds)
        self.metrics.watch_pool(self.pool)
        self.authenticator = Authenticator(settings, self.store, self.cache, self.hasher, self.metrics,
                                           self.audit, self.last_used, self._client_address)
        self.proxy = ProxyHandler(proxy, self.authenticator, self.signer, self.pool, self.metrics,
                                  self.log, self.streams, self.bindings)
        await self.refresh_key_gauge()
        self._tasks = [
            asyncio.create_task(self._every(settings.auth.store_poll_seconds, self.poll_store), name="poll"),
            asyncio.create_task(self._every(settings.auth.last_used_flush_seconds, self.flush_last_used),
                                name="last-used"),
            asyncio.create_task(self._every(1.0, self._housekeeping), name="housekeeping"),
            asyncio.create_task(self._every(0.5, self._flush_log), name="log-flush"),
        ]

    def _client_address(self, request: ClientRequest) -> str:
        assert self.proxy is not None
        return self.proxy.client_address(request)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.authenticator is not None:
            await self.authenticator.close()
        await self.flush()
        if self.pool is not None:
            await self.pool.close()
        await self.store.close()
        self.log.flush()

    async def flush(self) -> None:
        """Write what is batched in memory: last-used times and aggregated auth failures."""
        with contextlib.suppress(Exception):
            await self.flush_last_used()
        with contextlib.suppress(Exception):
            await self.audit.flush_failures(everything=True)

    # -- background work -------------------------------------------------------------------------

    async def _every(self, seconds: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the loop alive; report and try again next tick
                self.log.error("background job failed", job=getattr(job, "__name__", "?"), error=repr(exc))

    async def _flush_log(self) -> None:
        self.log.flush()

    async def flush_last_used(self) -> None:
        batch = self.last_used.take()
        if batch:
            await self.store.touch_last_used(batch)
        seen = self.bindings.take_seen()
        if seen:
            await self.store.touch_sessions(seen)

    async def poll_store(self) -> None:
        """Notice key changes made by another process (the CLI) within one poll interval."""
        marker = await self.store.external_change_marker()
        if marker == self._marker:
            return
        self._revision, changed = await self.store.changes_since(self._revision)
        for record in changed:
            self.key_changed(record)
        # Only once the changes are applied: if reading them failed, the next tick tries again
        # instead of taking the moved marker as handled (a missed disable would never be seen).
        self._marker = marker

    async def _housekeeping(self) -> None:
        if self.pool is not None:
            self.pool.expire_idle()
        await run_scheduled_disables(self.keys, self.store)
        await self._note_expiries()
        now = time.monotonic()
        if now >= self._next_prune:
            ttl_seconds = self.settings.proxy.session_binding_ttl_seconds
            self._next_prune = now + min(60.0, ttl_seconds)
            ttl = timedelta(seconds=ttl_seconds)
            await self.store.prune_sessions(utcnow() - ttl)
        await self.audit.flush_failures()
        await self.refresh_key_gauge()
        self.metrics.cache_size.set(len(self.cache))

    async def _note_expiries(self) -> None:
        """One ``key.expired`` audit event per expiry. The open requests of an expiring key are
        cut by the stream registry's timer at ``expires_at``; this only records it, once across
        every process sharing the store."""
        for record in await self.store.due_expiries(utcnow()):
            if record.workspace != self.settings.workspace:
                continue
            event = self.audit.event(KEY_EXPIRED, "scheduler", key_id=record.id, key_name=record.name,
                                     details={"expires_at": to_rfc3339(record.expires_at)})
            self.cache.invalidate(record.id)
            self.streams.cut(record.id)
            if await self.store.note_expired(record.id, event):
                self.audit.emitted(event)

    async def refresh_key_gauge(self) -> None:
        for status, count in (await self.store.count_by_status(self.settings.workspace)).items():
            self.metrics.keys.labels(status).set(count)

    def key_changed(self, record: KeyRecord) -> None:
        """A key changed: forget it now, and cut its open streams if it can no longer be used."""
        self.cache.invalidate(record.id)
        self.metrics.cache_size.set(len(self.cache))
        if record.status == DISABLED:
            self.streams.cut(record.id)
        else:
            # Enabled again: the same key works at once (SPEC 2), with no leftover refusals.
            self.streams.uncut(record.id)
            if self.authenticator is not None:
                self.authenticator.forgive(record.lookup_id)


