"""The activity audit: one ``tool.called`` event per MCP ``tools/call`` (docs/reference/admin-api.md,
Audit events), written in batches, and the retention that prunes old audit events
(docs/operations.md, Audit retention).

The proxy records a call with :meth:`ActivityLog.tool_called` on its request path: no I/O, a
bounds check and a tuple appended to a deque. A background task calls :meth:`ActivityLog.flush`
every second, which writes everything queued in one store transaction and then mirrors each event
as a JSON log line, like every other audit event. Memory is bounded: past ``max_pending`` events
waiting (queued, or kept after a failed write for the next attempt) new ones are dropped and
counted in ``toolio_sidecar_audit_events_dropped_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime, timedelta

from sidecar.keys.audit import TOOL_CALLED
from sidecar.keys.records import AuditRecord, utcnow
from sidecar.keys.store.base import KeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import AuditSettings

FLUSH_SECONDS = 1.0
MAX_PENDING = 100_000
PRUNE_EVERY_SECONDS = 3600.0
# Small batches, each its own short transaction, with a pause between them: pruning a backlog of
# millions of rows never holds the store's write lock for long.
PRUNE_BATCH = 2000
PRUNE_PAUSE_SECONDS = 0.05
# MCP tool names are at most 128 characters (MCP 2025-11-25, Tools: tool names); a refused call
# may name anything, so what is kept is bounded.
MAX_TOOL_NAME = 128
# Yield to the event loop after this many log lines while mirroring a large batch.
_LOG_SLICE = 1000

# (epoch seconds, key id, key name, tool, outcome, client, workspace)
_Call = tuple[float, str, str, str, str, str, str]


def _at(epoch: float) -> datetime:
    # Millisecond precision, as every stored time (sidecar.keys.records.utcnow).
    return datetime.fromtimestamp(int(epoch * 1000) / 1000, UTC)


class ActivityLog:
    """Queues ``tool.called`` events and writes them in batches; prunes expired audit events."""

    def __init__(self, store: KeyStore, log: JsonLog, metrics: Metrics, workspace: str,
                 settings: AuditSettings, *, max_pending: int = MAX_PENDING) -> None:
        self._store = store
        self._log = log
        self._metrics = metrics
        self.workspace = workspace
        self._settings = settings
        self._max_pending = max_pending
        self._queue: deque[_Call] = deque()
        # A batch the store refused, written first on the next flush (already counted as failed).
        self._unwritten: list[AuditRecord] = []
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Events waiting to be written."""
        return len(self._queue) + len(self._unwritten)

    def tool_called(self, *, key_id: str, key_name: str, tool: str, outcome: str, client: str,
                    workspace: str | None = None) -> None:
        """Record one ``tools/call`` (``outcome``: ``allowed`` or ``denied``) in ``workspace``
        (the caller's; default: the configured one). No I/O: queued for
        the next :meth:`flush`, or dropped and counted when the queue is full."""
        if len(self._queue) + len(self._unwritten) >= self._max_pending:
            self._metrics.audit_events_dropped.inc()
            return
        if len(tool) > MAX_TOOL_NAME:
            tool = tool[:MAX_TOOL_NAME]
        self._queue.append((time.time(), key_id, key_name, tool, outcome, client,
                            self.workspace if workspace is None else workspace))

    def _record(self, call: _Call) -> AuditRecord:
        when, key_id, key_name, tool, outcome, client, workspace = call
        return AuditRecord(time=_at(when), action=TOOL_CALLED, actor=key_name, workspace=workspace,
                           key_id=key_id, key_name=key_name, client=client,
                           details={"tool": tool, "outcome": outcome})

    async def flush(self) -> None:
        """Write every queued event in one transaction, then log each as a JSON line. On a store
        failure the batch is kept (within the bound) for the next flush and counted in
        ``audit_write_failures``; this never raises for a store failure."""
        # Shielded: a flush cancelled at shutdown still finishes its write, and the final flush
        # waits for it (the lock) instead of writing the same events twice or losing them.
        await asyncio.shield(self._flush())

    async def _flush(self) -> None:
        async with self._lock:
            queue, self._queue = self._queue, deque()
            if not queue and not self._unwritten:
                return
            retried = len(self._unwritten)
            batch = self._unwritten + [self._record(call) for call in queue]
            self._unwritten = []
            try:
                await self._store.append_audit(batch)
            except Exception as exc:
                self._metrics.audit_write_failures.inc(len(batch) - retried)
                # Kept for the next attempt, oldest first, as far as the bound allows; new calls
                # queued meanwhile count against the same bound.
                room = max(self._max_pending - len(self._queue), 0)
                self._unwritten = batch[:room]
                dropped = len(batch) - len(self._unwritten)
                if dropped:
                    self._metrics.audit_events_dropped.inc(dropped)
                self._log.error("audit write failed", action=TOOL_CALLED, count=len(batch), kept=len(self._unwritten),
                                error=type(exc).__name__)
                return
            for start in range(0, len(batch), _LOG_SLICE):
                if start:
                    await asyncio.sleep(0)
                for event in batch[start:start + _LOG_SLICE]:
                    self._log.write("info", "audit", event.as_json())

    async def prune(self) -> int:
        """Delete the audit events (every workspace of the store) older than
        ``audit.retention_days``, in short batches; returns how many. Safe on every replica at
        once: each batch takes rows no other replica is deleting."""
        older_than = utcnow() - timedelta(days=self._settings.retention_days)
        total = 0
        while True:
            deleted = await self._store.prune_audit(older_than, PRUNE_BATCH)
            total += deleted
            if deleted < PRUNE_BATCH:
                break
            await asyncio.sleep(PRUNE_PAUSE_SECONDS)
        if total:
            self._log.info("audit events pruned", count=total, retention_days=self._settings.retention_days)
        return total

    async def prune_forever(self, every: float = PRUNE_EVERY_SECONDS) -> None:
        """Prune now, then every ``every`` seconds, until cancelled; a failure is logged and the
        next round tries again."""
        while True:
            try:
                await self.prune()
            except Exception as exc:  # the store is away: the next round catches up
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # cancelled mid-prune: stop, as asked
                self._log.error("audit pruning failed", error=repr(exc))
            await asyncio.sleep(every)
