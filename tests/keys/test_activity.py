"""The activity audit's recorder (sidecar/keys/activity.py): ``tool.called`` events queued without
I/O, written in one batch per flush and mirrored as JSON log lines, bounded memory (drops
counted), a refused batch kept for the next flush, and retention (docs/operations.md, Audit
retention). Real stores: a SQLite file and a PostgreSQL schema."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.keys import activity
from sidecar.keys.activity import ActivityLog
from sidecar.keys.records import AuditRecord, utcnow
from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.sqlite import SQLiteKeyStore
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import AuditSettings
from tests.keys.conftest import new_store
from tests.support.config import ConfigFactory
from tests.support.harness import SidecarStarter, running_sidecar
from tests.support.metrics import sample
from tests.support.polling import eventually

DROPPED = "toolio_sidecar_audit_events_dropped_total"
FAILURES = "toolio_sidecar_audit_write_failures_total"


class Recorder:
    """An :class:`ActivityLog` with its own registry and log buffer."""

    def __init__(self, store: KeyStore, *, retention_days: int = 90, max_pending: int = activity.MAX_PENDING) -> None:
        self.registry = CollectorRegistry()
        self.stream = io.StringIO()
        self.log = ActivityLog(store, JsonLog(stream=self.stream, level="debug"), Metrics(self.registry), "acme",
                               AuditSettings(retention_days=retention_days), max_pending=max_pending)

    def call(self, tool: str = "get_plan", outcome: str = "allowed", key: str = "1") -> None:
        self.log.tool_called(key_id=f"key_{key:0>16}", key_name=f"agent-{key}", tool=tool, outcome=outcome,
                             client="192.0.2.7")

    def metric(self, name: str) -> float:
        return sample(self.registry, name)

    def lines(self, kind: str) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [line for line in parsed if line["type"] == kind]


async def calls_in(store: KeyStore) -> list[AuditRecord]:
    return await store.list_audit("acme", 10_000, None, action="tool.called")


async def test_a_call_is_queued_without_io_and_written_with_the_key_tool_outcome_and_client(store: KeyStore) -> None:
    recorder = Recorder(store)
    before = utcnow()
    recorder.call("get_plan", "allowed", key="1")
    recorder.call("delete_plan", "denied", key="2")
    assert recorder.log.pending == 2
    assert await calls_in(store) == []  # nothing written until the flush
    await recorder.log.flush()
    assert recorder.log.pending == 0
    newest, oldest = await calls_in(store)
    assert (oldest.action, oldest.actor, oldest.key_id, oldest.key_name, oldest.client, dict(oldest.details)) == (
        "tool.called", "agent-1", "key_0000000000000001", "agent-1", "192.0.2.7",
        {"tool": "get_plan", "outcome": "allowed"})
    assert oldest.workspace == "acme"
    assert before - timedelta(seconds=1) <= oldest.time <= utcnow()
    assert dict(newest.details) == {"tool": "delete_plan", "outcome": "denied"}
    # Each event is mirrored as a JSON log line, as every other audit event.
    logged = recorder.lines("audit")
    assert [(line["action"], line["details"]) for line in logged] == [
        ("tool.called", {"tool": "get_plan", "outcome": "allowed"}),
        ("tool.called", {"tool": "delete_plan", "outcome": "denied"})]
    assert logged[0]["key_name"] == "agent-1" and logged[0]["client"] == "192.0.2.7"
    await recorder.log.flush()  # nothing queued: nothing written twice
    assert len(await calls_in(store)) == 2


async def test_recording_needs_no_open_store(tmp_path: Path) -> None:
    # The proxy calls this on its request path: it must not touch the store.
    closed = SQLiteKeyStore(tmp_path / "never-opened.db")
    recorder = Recorder(closed)
    recorder.call()
    assert recorder.log.pending == 1
    assert not (tmp_path / "never-opened.db").exists()


async def test_past_the_bound_calls_are_dropped_and_counted(store: KeyStore) -> None:
    recorder = Recorder(store, max_pending=3)
    for n in range(5):
        recorder.call(f"tool_{n}")
    assert recorder.log.pending == 3
    assert recorder.metric(DROPPED) == 2
    await recorder.log.flush()
    assert sorted(e.details["tool"] for e in await calls_in(store)) == ["tool_0", "tool_1", "tool_2"]
    recorder.call("tool_5")  # room again after the flush
    await recorder.log.flush()
    assert len(await calls_in(store)) == 4
    assert recorder.metric(DROPPED) == 2


async def test_a_refused_batch_is_kept_for_the_next_flush_and_counted_once(store: KeyStore, backend_url: str,
                                                                           db_path: Path) -> None:
    # A store that cannot write (not open yet) refuses the batch; the same events go in later.
    pending = new_store(backend_url, db_path)
    recorder = Recorder(pending)
    recorder.call("first")
    recorder.call("second")
    await recorder.log.flush()
    await recorder.log.flush()  # refused again: not counted again
    assert recorder.log.pending == 2
    assert recorder.metric(FAILURES) == 2
    assert [line["message"] for line in recorder.lines("error")] == ["audit write failed"] * 2
    recorder.call("third")
    await pending.open()
    try:
        await recorder.log.flush()
    finally:
        await pending.close()
    assert recorder.log.pending == 0
    assert [e.details["tool"] for e in await calls_in(store)] == ["third", "second", "first"]
    assert recorder.metric(FAILURES) == 2


async def test_a_kept_batch_stays_within_the_bound(tmp_path: Path) -> None:
    recorder = Recorder(SQLiteKeyStore(tmp_path / "sidecar.db"), max_pending=4)
    for n in range(3):
        recorder.call(f"kept_{n}")
    await recorder.log.flush()  # refused: 3 kept
    recorder.call("queued")
    recorder.call("over")  # 3 kept + 1 queued + this one > 4
    assert recorder.log.pending == 4
    assert recorder.metric(DROPPED) == 1


async def test_tool_names_are_bounded(store: KeyStore) -> None:
    recorder = Recorder(store)
    recorder.call("x" * 10_000, "denied")
    await recorder.log.flush()
    (event,) = await calls_in(store)
    assert event.details["tool"] == "x" * activity.MAX_TOOL_NAME


async def test_prune_deletes_what_is_older_than_the_retention_in_batches(store: KeyStore,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activity, "PRUNE_BATCH", 3)
    monkeypatch.setattr(activity, "PRUNE_PAUSE_SECONDS", 0)
    now = utcnow()

    def event(action: str, age_days: float) -> AuditRecord:
        return AuditRecord(time=now - timedelta(days=age_days), action=action, actor="cli", workspace="acme")

    await store.append_audit([event("expired", 31 + n) for n in range(7)])
    await store.append_audit([event("kept", 29), event("kept", 2)])
    recorder = Recorder(store, retention_days=30)
    assert await recorder.log.prune() == 7
    assert [e.action for e in await store.list_audit("acme", 100, None)] == ["kept", "kept"]
    (line,) = [line for line in recorder.lines("event") if line["message"] == "audit events pruned"]
    assert (line["count"], line["retention_days"]) == (7, 30)
    assert await recorder.log.prune() == 0


# ---- in a running sidecar ------------------------------------------------------------------------


async def test_a_running_sidecar_writes_calls_within_a_second_or_so(config: ConfigFactory,
                                                                   start_sidecar: SidecarStarter) -> None:
    sc = await start_sidecar(config.settings())
    sc.services.activity.tool_called(key_id="key_0000000000000001", key_name="agent", tool="get_plan",
                                     outcome="allowed", client="127.0.0.1")

    async def written() -> list[AuditRecord]:
        found = await calls_in(sc.services.store)
        assert found
        return found

    (event,) = await eventually(written)
    assert event.details == {"tool": "get_plan", "outcome": "allowed"}


async def test_calls_queued_at_shutdown_are_written_before_the_store_closes(config: ConfigFactory) -> None:
    settings = config.settings()
    async with running_sidecar(settings) as sc:
        for n in range(3):
            sc.services.activity.tool_called(key_id="key_0000000000000001", key_name="agent", tool=f"t{n}",
                                             outcome="denied", client="127.0.0.1")
    store = SQLiteKeyStore(settings.database_path)
    await store.open()
    try:
        assert sorted(e.details["tool"] for e in await calls_in(store)) == ["t0", "t1", "t2"]
    finally:
        await store.close()


async def test_a_starting_sidecar_prunes_events_past_the_retention(config: ConfigFactory,
                                                                   start_sidecar: SidecarStarter) -> None:
    settings = config.settings({"audit": {"retention_days": 7}})
    store = SQLiteKeyStore(settings.database_path)
    await store.open()
    now = utcnow()
    try:
        await store.append_audit([AuditRecord(time=now - timedelta(days=age), action=f"age.{age}", actor="cli",
                                              workspace="acme") for age in (8, 30, 6)])
    finally:
        await store.close()
    sc = await start_sidecar(settings)

    async def pruned() -> bool:
        return [e.action for e in await sc.services.store.list_audit("acme", 10, None)] == ["age.6"]

    await eventually(pruned)
