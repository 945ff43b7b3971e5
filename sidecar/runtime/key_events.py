"""The one fan-out of key changes (docs/architecture.md, "A disable").

Whatever changed a key (this process's admin API, the CLI in another process, another replica
sharing the store) ends here: the verified-key cache forgets the key, and a key that can no
longer be used has its open requests cut. Changes made elsewhere arrive two ways:

* SQLite (one file): the store's cheap ``external_change_marker`` is polled every
  ``auth.store_poll_seconds``; when it moves, ``changes_since`` says which keys changed.
* PostgreSQL (several replicas): the store's change feed (LISTEN/NOTIFY on a dedicated
  connection) announces each committed revision; the same ``changes_since`` applies it. The
  poll loop stays as a safety net. A notification sent while the feed was disconnected is lost,
  so after every reconnect the feed announces the current revision and we catch up from ours.

While the feed cannot confirm that every change has been applied for longer than
``store.max_staleness_seconds``, :attr:`trusted` is False and the authenticator re-reads each
cached key from the store (503 when it cannot): a missed notification never lets a disabled
key through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.gate.cache import KeyCache
from sidecar.keys.records import DISABLED, KeyRecord
from sidecar.keys.store.base import ChangeFeed, KeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.proxy.streams import StreamRegistry


class KeyEvents:
    def __init__(self, store: KeyStore, cache: KeyCache, streams: StreamRegistry, metrics: Metrics,
                 log: JsonLog, *, max_staleness_seconds: float) -> None:
        self._store = store
        self._cache = cache
        self._streams = streams
        self._metrics = metrics
        self._log = log
        self._max_staleness = max_staleness_seconds
        # Called with a key's lookup id when it is enabled again (its failure budget is forgiven).
        self.on_enabled: Callable[[str], None] | None = None
        self.revision = 0  # every change up to this revision has been applied here
        self._marker = 0
        self._feed: ChangeFeed | None = None
        self._catching_up: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        # May a verified key in the cache be believed without asking the store? Read per request,
        # so it is a plain attribute, updated by the feed and the poll loop.
        self.trusted = True

    async def start(self) -> None:
        self.revision, _ = await self._store.changes_since(1 << 62)
        self._marker = await self._store.external_change_marker()
        self._feed = await self._store.listen(self._announced)
        self._judge()

    async def close(self) -> None:
        if self._catching_up is not None:
            self._catching_up.cancel()
            await asyncio.gather(self._catching_up, return_exceptions=True)
        if self._feed is not None:
            await self._feed.close()
            self._feed = None

    # -- the fan-out ---------------------------------------------------------------------------

    def key_changed(self, record: KeyRecord) -> None:
        """A key changed: forget it now, and cut its open requests if it can no longer be used."""
        cached = self._cache.revision_of(record.id)
        if cached is not None and cached >= record.revision and record.status != DISABLED:
            # Already verified from this very record (this process's own change, coming back
            # through the feed after the key was used): nothing to forget.
            return
        self._cache.invalidate(record.id, record.revision)
        self._metrics.cache_size.set(len(self._cache))
        if record.status == DISABLED:
            self._streams.cut(record.id)
        else:
            # Enabled again: the same key works at once, with no leftover refusals.
            self._streams.uncut(record.id)
            if self.on_enabled is not None:
                self.on_enabled(record.lookup_id)

    # -- changes made elsewhere ----------------------------------------------------------------

    async def catch_up(self) -> None:
        """Apply every change committed after :attr:`revision`."""
        async with self._sync_lock:
            newest, changed = await self._store.changes_since(self.revision)
            for record in changed:
                self.key_changed(record)
            self.revision = max(self.revision, newest)
        self._judge()

    async def poll(self) -> None:
        """The periodic check: the store's marker (SQLite), or a revision the feed announced
        but that is not applied yet (a failed catch-up is retried here)."""
        if self._feed is None:
            marker = await self._store.external_change_marker()
            if marker != self._marker:
                await self.catch_up()
                # Only once the changes are applied: if reading them failed, the next tick tries
                # again instead of taking the moved marker as handled.
                self._marker = marker
        elif self._feed.delivered_revision > self.revision:
            await self.catch_up()
        self._judge()

    def _announced(self, revision: int) -> None:
        if revision > self.revision and (self._catching_up is None or self._catching_up.done()):
            self._catching_up = asyncio.get_running_loop().create_task(self._catch_up_quietly())

    async def _catch_up_quietly(self) -> None:
        try:
            await self.catch_up()
        except Exception as exc:  # the poll loop retries; meanwhile trust decays (see _judge)
            self._log.warning("key change catch-up failed", error=repr(exc))

    def _judge(self) -> None:
        feed = self._feed
        if feed is None:
            trusted = True
        else:
            trusted = feed.is_current(self._max_staleness) and self.revision >= feed.delivered_revision
        if trusted != self.trusted:
            self.trusted = trusted
            self._log.warning("key cache " + ("trusted again: the change feed is current" if trusted else
                                              "not trusted: the change feed is stale; keys are re-checked "
                                              "in the store on every request"))
        self._metrics.cache_trusted.set(1 if trusted else 0)
