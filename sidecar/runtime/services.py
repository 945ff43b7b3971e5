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
from sidecar.gate.oauth import OAuthGate
from sidecar.gate.peers import ClientRequest
from sidecar.gate.quota import Quota
from sidecar.gate.sessions import SessionBindings
from sidecar.gate.workspaces import HostWorkspaces
from sidecar.http.client import UpstreamPool
from sidecar.keys.activity import FLUSH_SECONDS, ActivityLog
from sidecar.keys.audit import KEY_EXPIRED, AuditLog
from sidecar.keys.format import KeyHasher
from sidecar.keys.manager import KeyManager, run_scheduled_disables
from sidecar.keys.records import to_rfc3339, utcnow
from sidecar.keys.store import store_for
from sidecar.keys.store.base import KeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.proxy.assertion import STORED_KEYS_REFRESH_SECONDS, Signer, configured_keys, signing_keys
from sidecar.proxy.handler import ProxyHandler
from sidecar.proxy.streams import StreamRegistry
from sidecar.runtime.key_events import KeyEvents
from sidecar.settings import Settings


class Services:
    def __init__(self, settings: Settings, *, log: JsonLog | None = None,
                 registry: CollectorRegistry | None = None, store: KeyStore | None = None) -> None:
        self.settings = settings
        self.log = log or JsonLog(level=settings.log_level)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.store: KeyStore = store or store_for(settings)
        self.hasher = KeyHasher(settings.argon2)
        self.cache = KeyCache(settings.auth.cache_size, settings.auth.negative_cache_size,
                              settings.auth.negative_cache_ttl_seconds,
                              on_evict=self.metrics.cache_evictions.inc)
        self.audit = AuditLog(self.store, self.log, self.metrics, settings.workspace)
        self.activity = ActivityLog(self.store, self.log, self.metrics, settings.workspace, settings.audit)
        self.last_used = LastUsed()
        self.streams = StreamRegistry()
        self.bindings = SessionBindings(self.store, settings.proxy.session_binding_max,
                                        settings.proxy.session_binding_ttl_seconds)
        self.events = KeyEvents(self.store, self.cache, self.streams, self.metrics, self.log,
                                max_staleness_seconds=settings.store.max_staleness_seconds)
        self.keys = KeyManager(settings, self.store, self.hasher, self.audit, on_change=self.events.key_changed)
        self.oauth = OAuthGate(settings, self.metrics, self.log)
        self.quota = Quota(settings.limits, self.metrics, self.log)
        self.signer: Signer | None = None
        self.pool: UpstreamPool | None = None
        self.authenticator: Authenticator | None = None
        self.proxy: ProxyHandler | None = None
        self.draining = False
        self._users = 0
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
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
        await self.store.open()  # applies pending migrations (under a lock on a shared store)
        try:
            self.signer = Signer(await signing_keys(settings.signing, settings.data_dir, self.store),
                                 settings.signing)
            await self.events.start()
            await self.oauth.open()
        except BaseException:
            await self.store.close()
            raise
        proxy = settings.proxy
        self.pool = UpstreamPool(proxy.upstream, max_connections=proxy.upstream_max_connections,
                                 pool_timeout=proxy.upstream_pool_timeout_seconds,
                                 connect_timeout=proxy.upstream_timeout_seconds)
        self.metrics.watch_pool(self.pool)
        self.authenticator = Authenticator(settings, self.store, self.cache, self.hasher, self.metrics,
                                           self.audit, self.last_used, self._client_address, trust=self.events,
                                           oauth=self.oauth)
        self.events.on_enabled = self.authenticator.forgive
        self.proxy = ProxyHandler(proxy, self.authenticator, self.signer, self.pool, self.metrics,
                                  self.log, self.streams, self.bindings, self.activity, self.quota,
                                  workspaces=HostWorkspaces(settings.workspaces, proxy.trusted_proxies)
                                  if settings.workspaces is not None else None)
        await self.refresh_key_gauge()
        self._tasks = [
            asyncio.create_task(self._every(settings.auth.store_poll_seconds, self.events.poll), name="poll"),
            asyncio.create_task(self._every(settings.auth.last_used_flush_seconds, self.flush_last_used),
                                name="last-used"),
            asyncio.create_task(self._every(1.0, self._housekeeping), name="housekeeping"),
            asyncio.create_task(self._every(0.5, self._flush_log), name="log-flush"),
            asyncio.create_task(self._every(FLUSH_SECONDS, self.activity.flush), name="activity-flush"),
            asyncio.create_task(self.activity.prune_forever(), name="audit-prune"),
        ]
        if self.store.shared and not configured_keys(settings.signing):
            self._tasks.append(asyncio.create_task(
                self._every(STORED_KEYS_REFRESH_SECONDS, self.refresh_signing_keys), name="signing-keys"))

    def _client_address(self, request: ClientRequest) -> str:
        assert self.proxy is not None
        return self.proxy.client_address(request)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.events.close()
        await self.oauth.close()
        await self.quota.close()
        if self.authenticator is not None:
            await self.authenticator.close()
        await self.flush()
        if self.pool is not None:
            await self.pool.close()
        await self.store.close()
        self.log.flush()

    async def flush(self) -> None:
        """Write what is batched in memory: last-used times, aggregated auth failures and
        ``tool.called`` events."""
        with contextlib.suppress(Exception):
            await self.flush_last_used()
        with contextlib.suppress(Exception):
            await self.activity.flush()
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
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # The job turned our cancellation into another error (a driver's cleanup
                    # failing on the way out): stop anyway, or close() would wait forever.
                    raise asyncio.CancelledError from exc
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
            if not self.settings.multi_workspace and record.workspace != self.settings.workspace:
                continue
            event = self.audit.event(KEY_EXPIRED, "scheduler", key_id=record.id, key_name=record.name,
                                     workspace=record.workspace,
                                     details={"expires_at": to_rfc3339(record.expires_at)})
            self.cache.invalidate(record.id)
            self.streams.cut(record.id)
            if await self.store.note_expired(record.id, event):
                self.audit.emitted(event)

    async def refresh_signing_keys(self) -> None:
        """Re-read the shared key set: publish a rotated-in key at once, sign with it once its
        time has come (see sidecar.proxy.assertion, STORED_KEYS_PUBLISH_SECONDS)."""
        assert self.signer is not None
        keys = await signing_keys(self.settings.signing, self.settings.data_dir, self.store)
        if tuple(k.kid for k in keys) != self.signer.kids:
            self.signer.use(keys)
            self.log.info("signing keys changed", signing_kid=keys[0].kid, published=len(keys))

    async def refresh_key_gauge(self) -> None:
        # With [workspaces], every workspace's keys together: metrics carry no workspace label
        # (one per workspace would be unbounded; docs/reference/metrics.md).
        scope = None if self.settings.multi_workspace else self.settings.workspace
        for status, count in (await self.store.count_by_status(scope)).items():
            self.metrics.keys.labels(status).set(count)
