"""``create_app(settings)``: both applications and the resources they share.

The proxy app (public listener, served by ``sidecar.listener``) and the admin app (an aiohttp
application on the admin listener) share one :class:`Services`: store, caches, signer, metrics,
the upstream connection pool, the stream registry and background tasks. Each listener acquires
it while it runs, so the first one started opens it and the last one stopped closes it,
whatever the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sidecar import state
from sidecar.apikeys import KeyHasher
from sidecar.assertion import Signer, load_signing_keys
from sidecar.audit import KEY_EXPIRED, AuditLog
from sidecar.auth import Authenticator, LastUsed
from sidecar.cache import KeyCache
from sidecar.errors import json_response
from sidecar.keys import KeyManager, run_scheduled_disables
from sidecar.listener import Request
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.peers import ClientRequest
from sidecar.proxy import ProxyHandler, SessionBindings, StreamRegistry
from sidecar.settings import Settings
from sidecar.store import DISABLED, KeyRecord, KeyStore, SQLiteKeyStore, to_rfc3339, utcnow
from sidecar.upstream import UpstreamPool

# OAuth discovery probes (RFC 9728, RFC 8414, OIDC Discovery) answered with a JSON 404 so MCP
# clients in API-key mode learn at once that there is no authorization server here.
DISCOVERY_PREFIXES = ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server",
                      "/.well-known/openid-configuration")


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


@dataclass(frozen=True)
class SidecarApps:
    proxy: ProxyApp
    admin: web.Application
    services: Services


async def healthz(_: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def jwks(request: web.Request) -> web.Response:
    services = request.app[state.SERVICES]
    assert services.signer is not None
    return web.Response(body=services.signer.jwks_body, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=300"})


def _services_ctx(services: Services) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_: web.Application) -> AsyncIterator[None]:
        await services.acquire()
        try:
            yield
        finally:
            await services.release()
    return ctx


class ProxyApp:
    """The public listener's application (SPEC 3): ``GET /healthz``, ``GET /.well-known/jwks.json``
    and the OAuth discovery probes are answered here without auth; every other request is the
    proxy's. No middlewares: the hot path is one handler (DESIGN: a cache hit does no extra work)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(self, request: Request) -> None:
        method = request.method
        if method == "CONNECT":
            # A tunnel (RFC 9110 9.3.6) is not something an MCP server offers, and a 2xx would turn
            # the connection into one: no route takes it.
            request.respond(404, "Not Found", _JSON, _NOT_FOUND, close=True)
            return
        path = request.path  # decoded, without query or fragment: routes match it as any router's would
        if path == "/healthz" and method in ("GET", "HEAD"):
            request.respond(200, "OK", _JSON, _OK)
        elif path == "/.well-known/jwks.json" and method in ("GET", "HEAD"):
            signer = self.services.signer
            assert signer is not None
            request.respond(200, "OK", _JWKS_HEADERS, signer.jwks_body)
        elif path in DISCOVERY_PREFIXES or path.startswith(_DISCOVERY_TREES):
            # Any method: a probe is never forwarded upstream or answered with an auth challenge.
            request.respond(404, "Not Found", _JSON, _NOT_OAUTH)
        else:
            proxy = self.services.proxy
            assert proxy is not None
            await proxy(request)


_DISCOVERY_TREES = tuple(prefix + "/" for prefix in DISCOVERY_PREFIXES)
_JSON = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
_JWKS_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "public, max-age=300"))
_OK = json.dumps({"status": "ok"}).encode()
_NOT_FOUND = json.dumps({"error": "not_found", "error_description": "Not Found"}).encode()
_NOT_OAUTH = json.dumps({
    "error": "not_found",
    "error_description": "This server uses API keys (Authorization: Bearer tak_...), not OAuth"}).encode()


async def readyz(request: web.Request) -> web.Response:
    services = request.app[state.SERVICES]
    if services.draining:
        return json_response(503, {"status": "draining"})
    try:
        await asyncio.wait_for(services.store.ping(), timeout=2.0)
    except Exception:
        return json_response(503, {"status": "store unavailable"})
    return json_response(200, {"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    services = request.app[state.SERVICES]
    services.metrics.cache_size.set(len(services.cache))
    return web.Response(body=generate_latest(services.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_ops_app(services: Services) -> web.Application:
    """The admin listener's operational endpoints; the key-management UI and API are added by
    the ``admin`` package (``admin.app.install``)."""
    app = web.Application(client_max_size=64 * 1024)
    app[state.SERVICES] = services
    app.cleanup_ctx.append(_services_ctx(services))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/.well-known/jwks.json", jwks)
    return app


def create_app(settings: Settings, *, log: JsonLog | None = None,
               registry: CollectorRegistry | None = None) -> SidecarApps:
    """Both applications, sharing one :class:`Services`; used by the CLI and every test."""
    services = Services(settings, log=log, registry=registry)
    proxy = ProxyApp(services)
    admin = create_ops_app(services)
    for install in admin_installers():
        install(admin, services)
    return SidecarApps(proxy=proxy, admin=admin, services=services)


# The admin package builds on sidecar, never the other way round (DESIGN: ``sidecar`` never
# imports ``admin``): it registers its routes through this entry-point group in pyproject.toml,
# so the composition is declared by the distribution, not imported here.
ADMIN_ENTRY_POINTS = "toolio_sidecar.admin"


def admin_installers() -> list[Callable[[web.Application, Services], None]]:
    """The admin API and page installers the installed distribution declares (at least one)."""
    found = [entry.load() for entry in entry_points(group=ADMIN_ENTRY_POINTS)]
    if not found:
        # Without it the admin listener would serve no API or page: a broken install, not a mode.
        raise RuntimeError(f"no {ADMIN_ENTRY_POINTS!r} entry point: install the toolio-sidecar distribution "
                           "(pip install .) rather than running from a bare source tree")
    return found
