"""Audit events (docs/reference/admin-api.md): durable rows in the store, mirrored as JSON log lines.

Key changes carry their audit row into the store's own transaction (see ``KeyStore``), so an
API success means both are on disk. ``auth.failed`` is aggregated: one row per lookup id /
client address per minute with a count (written within a few seconds), never one row per bad
request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sidecar.keys.records import AuditRecord, utcnow
from sidecar.keys.store.base import KeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics

KEY_CREATED = "key.created"
KEY_DISABLED = "key.disabled"
KEY_ENABLED = "key.enabled"
KEY_ROTATED = "key.rotated"
KEY_UPDATED = "key.updated"  # details: {"<field>": {"from": ..., "to": ...}} (today: rate_limit)
KEY_IMPORTED = "key.imported"
KEY_EXPIRED = "key.expired"
ADMIN_LOGIN = "admin.login"
ADMIN_LOGIN_FAILED = "admin.login_failed"
ADMIN_LOGOUT = "admin.logout"
AUTH_FAILED = "auth.failed"
TOOL_CALLED = "tool.called"
FAILURE_FLUSH_SECONDS = 5.0


class AuditLog:
    def __init__(self, store: KeyStore, log: JsonLog, metrics: Metrics, workspace: str) -> None:
        self._store = store
        self._log = log
        self._metrics = metrics
        self.workspace = workspace
        # (minute, lookup id, client, workspace) -> (count, reasons)
        self._failures: dict[tuple[int, str, str, str], tuple[int, dict[str, int]]] = {}
        self._oldest_pending: float | None = None  # monotonic time of the oldest unwritten failure

    def event(self, action: str, actor: str, *, key_id: str | None = None, key_name: str | None = None,
              client: str | None = None, details: Mapping[str, Any] | None = None,
              time: datetime | None = None, workspace: str | None = None) -> AuditRecord:
        """An event of ``workspace`` (default: the configured one; with [workspaces], the
        request's or the acting key's)."""
        return AuditRecord(time=time or utcnow(), action=action, actor=actor,
                           workspace=self.workspace if workspace is None else workspace,
                           key_id=key_id, key_name=key_name, client=client, details=dict(details or {}))

    def emitted(self, event: AuditRecord) -> None:
        """Mirror an event the store already holds as a JSON log line."""
        self._log.write("info", "audit", event.as_json())

    async def record(self, event: AuditRecord) -> None:
        """Write one event durably, then log it. A store failure is counted and re-raised."""
        try:
            await self._store.append_audit([event])
        except Exception:
            self._metrics.audit_write_failures.inc()
            self._log.error("audit write failed", action=event.action)
            raise
        self.emitted(event)

    def auth_failed(self, lookup_id: str | None, client: str, reason: str, workspace: str | None = None) -> None:
        """Count a failed authentication; :meth:`flush_failures` writes the aggregated rows."""
        if self._oldest_pending is None:
            self._oldest_pending = time.monotonic()
        slot = (int(time.time() // 60), lookup_id or "", client, self.workspace if workspace is None else workspace)
        count, reasons = self._failures.get(slot, (0, {}))
        reasons[reason] = reasons.get(reason, 0) + 1
        self._failures[slot] = (count + 1, reasons)
        if len(self._failures) > 50_000:  # bounded memory under a spray of addresses
            asyncio.get_running_loop().create_task(self.flush_failures(everything=True))

    async def flush_failures(self, *, everything: bool = False) -> None:
        current = int(time.time() // 60)
        # Rows appear within a few seconds (an operator watching the audit view sees an attack
        # while it happens); each row still aggregates every failure of its lookup id / address
        # since the previous write, never one row per bad request.
        if self._oldest_pending is not None and time.monotonic() - self._oldest_pending >= FAILURE_FLUSH_SECONDS:
            everything = True
        due = [slot for slot in self._failures if everything or slot[0] < current]
        if not self._failures or len(due) == len(self._failures):
            self._oldest_pending = None
        if not due:
            return
        events = []
        names: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        for slot in due:
            count, reasons = self._failures.pop(slot)
            minute, lookup_id, client, workspace = slot
            # docs/reference/admin-api.md: the key name appears in every event about a key, so failures against a real
            # key's lookup id name it (a lookup id is not secret; the failed secret is never kept).
            if lookup_id and (lookup_id, workspace) not in names:
                try:
                    record = await self._store.get_by_lookup_id(lookup_id)
                except Exception:
                    record = None
                # Only a key of the event's own workspace is named: another workspace's key is, to
                # this workspace, unknown.
                same = record is not None and record.workspace == workspace
                names[lookup_id, workspace] = (record.id, record.name) if same and record else (None, None)
            key_id, key_name = names.get((lookup_id, workspace), (None, None))
            events.append(self.event(
                AUTH_FAILED, "anonymous", client=client, key_id=key_id, key_name=key_name, workspace=workspace,
                details={"lookup_id": lookup_id or None, "count": count, "reasons": reasons,
                         "minute": datetime.fromtimestamp(minute * 60, UTC).isoformat().replace("+00:00", "Z")},
            ))
        try:
            await self._store.append_audit(events)
        except Exception:
            self._metrics.audit_write_failures.inc(len(events))
            self._log.error("audit write failed", action=AUTH_FAILED, count=len(events))
            return
        for event in events:
            self.emitted(event)
