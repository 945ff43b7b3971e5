"""Audit retention and the audit queries of both stores (docs/operations.md, Audit retention;
docs/reference/admin-api.md, Audit events): the database itself refuses to change any audit row
and to delete one younger than a day, pruning removes only old rows in bounded batches, the audit
filters and a key's tool activity read through indexes."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidecar.keys.records import AuditRecord, KeyRecord, ToolUsage, utcnow
from sidecar.keys.store import postgres, sqlite
from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.postgres import PostgresKeyStore
from sidecar.keys.store.sqlite import SQLiteKeyStore, _split_sql
from tests.keys.conftest import new_store
from tests.support.records import audit_record, key_record


class RawDatabase:
    """Plain SQL on the store's database, behind the store's back (what an operator's psql or
    sqlite3 shell, or a bug, could send)."""

    def __init__(self, url: str, path: Path) -> None:
        self.url = url
        self.path = path

    async def execute(self, sql: str) -> None:
        if self.url:
            con = await asyncpg.connect(self.url)
            try:
                await con.execute(sql)
            finally:
                await con.close()
        else:
            with sqlite3.connect(self.path) as file:
                file.execute(sql)

    async def refused(self, sql: str) -> str:
        """The database's refusal of ``sql`` (fails when it is accepted)."""
        errors = (asyncpg.PostgresError,) if self.url else (sqlite3.DatabaseError,)
        with pytest.raises(errors) as caught:
            await self.execute(sql)
        return str(caught.value)


@pytest.fixture
def raw(backend_url: str, db_path: Path) -> RawDatabase:
    return RawDatabase(backend_url, db_path)


def days_ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


def event(action: str = "key.created", *, age_days: float = 0.0, key: KeyRecord | None = None,
          workspace: str = "acme", **details: Any) -> AuditRecord:
    record = audit_record(action, key, when=days_ago(age_days))
    return replace(record, workspace=workspace, details=details or dict(record.details))


def tool_call(key: KeyRecord, tool: str, outcome: str, *, age_hours: float = 1.0) -> AuditRecord:
    return AuditRecord(time=utcnow() - timedelta(hours=age_hours), action="tool.called", actor=key.name,
                       workspace=key.workspace, key_id=key.id, key_name=key.name, client="127.0.0.1",
                       details={"tool": tool, "outcome": outcome})


async def everything(store: KeyStore, workspace: str = "acme") -> list[AuditRecord]:
    return await store.list_audit(workspace, 10_000, None)


# ---- what the database refuses ---------------------------------------------------------------


async def test_an_event_younger_than_a_day_cannot_be_deleted_or_updated(store: KeyStore, raw: RawDatabase) -> None:
    await store.append_audit([event(age_days=0.9), event("admin.login")])
    for sql in ("DELETE FROM audit_events", "DELETE FROM audit_events WHERE action = 'admin.login'",
                "UPDATE audit_events SET actor = 'mallory'"):
        assert "append-only" in await raw.refused(sql)
    assert len(await everything(store)) == 2


async def test_an_old_event_can_be_deleted_but_still_not_changed(store: KeyStore, raw: RawDatabase) -> None:
    await store.append_audit([event("old.one", age_days=1.1), event("young.one", age_days=0.5)])
    assert "append-only" in await raw.refused("UPDATE audit_events SET actor = 'mallory' WHERE action = 'old.one'")
    await raw.execute("DELETE FROM audit_events WHERE action = 'old.one'")
    assert [e.action for e in await everything(store)] == ["young.one"]


async def test_truncate_is_refused_on_postgresql(backend_url: str, raw: RawDatabase, store: KeyStore) -> None:
    await store.append_audit([event(age_days=400)])
    if backend_url:  # SQLite has no TRUNCATE: its DELETE without WHERE meets the row trigger above
        assert "append-only" in await raw.refused("TRUNCATE audit_events")
    assert len(await everything(store)) == 1


# ---- pruning -------------------------------------------------------------------------------------


async def test_prune_deletes_only_events_older_than_the_cutoff_in_bounded_batches(store: KeyStore) -> None:
    await store.append_audit([event("expired", age_days=100 + n) for n in range(5)])
    await store.append_audit([event("kept", age_days=10), event("kept", age_days=0)])
    await store.append_audit([event("expired", age_days=200, workspace="globex")])  # every workspace
    cutoff = days_ago(90)
    assert [await store.prune_audit(cutoff, 2) for _ in range(4)] == [2, 2, 2, 0]
    assert [e.action for e in await everything(store)] == ["kept", "kept"]
    assert await everything(store, "globex") == []


async def test_prune_removes_the_oldest_first(store: KeyStore) -> None:
    # Inserted newest first: ids and times run in opposite directions.
    await store.append_audit([event(f"age.{n}", age_days=n) for n in (30, 20, 10)])
    assert await store.prune_audit(days_ago(5), 1) == 1
    assert {e.action for e in await everything(store)} == {"age.20", "age.10"}


async def test_replicas_pruning_at_once_delete_each_event_once(store: KeyStore, backend_url: str,
                                                             db_path: Path) -> None:
    await store.append_audit([event("expired", age_days=100 + n) for n in range(30)] + [event("kept")])
    others = [new_store(backend_url, db_path) for _ in range(2)]
    for other in others:
        await other.open()
    try:
        async def drain(s: KeyStore) -> int:
            total = 0
            while deleted := await s.prune_audit(days_ago(90), 4):
                total += deleted
            return total

        counts = await asyncio.gather(drain(store), *(drain(other) for other in others))
    finally:
        for other in others:
            await other.close()
    assert sum(counts) == 30
    assert [e.action for e in await everything(store)] == ["kept"]


async def test_prune_never_asks_for_an_event_younger_than_a_day(store: KeyStore) -> None:
    # A cutoff in the future (a misread setting, a clock ahead of the database's) still deletes
    # nothing the trigger protects, so the batch is not refused as a whole.
    await store.append_audit([event("old", age_days=3), event("young", age_days=0.5), event("now")])
    assert await store.prune_audit(utcnow() + timedelta(days=30), 100) == 1
    assert sorted(e.action for e in await everything(store)) == ["now", "young"]


# ---- filters and a key's tool activity -------------------------------------------------------------


async def test_list_audit_filters_by_action_and_key_id_combined_with_and(store: KeyStore) -> None:
    a, b = key_record(1), key_record(2)
    await store.append_audit([event("key.created", key=a), event("key.created", key=b),
                              tool_call(a, "get_plan", "allowed"), tool_call(b, "get_plan", "denied"),
                              tool_call(a, "delete_plan", "denied"), event("admin.login")])
    await store.append_audit([replace(tool_call(a, "get_plan", "allowed"), workspace="globex")])

    def shape(events: list[AuditRecord]) -> list[tuple[str, str | None]]:
        return [(e.action, e.key_id) for e in events]

    calls = await store.list_audit("acme", 10, None, action="tool.called")
    assert shape(calls) == [("tool.called", a.id), ("tool.called", b.id), ("tool.called", a.id)]
    about_a = await store.list_audit("acme", 10, None, key_id=a.id)
    assert shape(about_a) == [("tool.called", a.id), ("tool.called", a.id), ("key.created", a.id)]
    both = await store.list_audit("acme", 10, None, action="tool.called", key_id=a.id)
    assert [e.details["tool"] for e in both] == ["delete_plan", "get_plan"]
    # Paging keeps the filters, and the positional form still lists everything.
    page = await store.list_audit("acme", 1, None, action="tool.called", key_id=a.id)
    rest = await store.list_audit("acme", 10, page[0].id, action="tool.called", key_id=a.id)
    assert page + rest == both
    assert len(await store.list_audit("acme", 100, None)) == 6
    assert await store.list_audit("acme", 10, None, action="nothing.here") == []
    assert await store.list_audit("acme", 10, None, key_id="key_unknown") == []


async def test_tool_activity_counts_calls_per_tool_and_outcome_since_a_time(store: KeyStore) -> None:
    a, b = key_record(1), key_record(2)
    calls = [tool_call(a, "get_plan", "allowed") for _ in range(3)]
    calls += [tool_call(a, "get_plan", "denied"), tool_call(a, "delete_plan", "denied"),
              tool_call(a, "delete_plan", "denied"), tool_call(a, "a_tool", "allowed")]
    calls += [tool_call(a, "get_plan", "allowed", age_hours=30) for _ in range(5)]  # before the window
    calls += [tool_call(b, "get_plan", "allowed"), replace(tool_call(a, "x", "allowed"), workspace="globex")]
    calls += [replace(tool_call(a, "not_a_call", "allowed"), action="key.created")]
    await store.append_audit(calls)
    usage = await store.tool_activity("acme", a.id, utcnow() - timedelta(hours=24))
    # Most called first; ties by name.
    assert usage == [ToolUsage("get_plan", 3, 1), ToolUsage("delete_plan", 0, 2), ToolUsage("a_tool", 1, 0)]
    assert usage[0].as_json() == {"tool": "get_plan", "allowed": 3, "denied": 1}
    assert await store.tool_activity("acme", "key_unknown", utcnow() - timedelta(hours=24)) == []


# ---- indexes -------------------------------------------------------------------------------------

FILTERS = {
    "audit_workspace_action_id": ("SELECT id FROM audit_events WHERE workspace = {ws} AND action = 'tool.called' "
                                  "ORDER BY id DESC LIMIT 50"),
    "audit_workspace_key_id": "SELECT id FROM audit_events WHERE workspace = {ws} AND key_id = 'key_a' "
                              "ORDER BY id DESC LIMIT 50",
    "audit_tool_calls": "SELECT details FROM audit_events WHERE workspace = {ws} AND key_id = 'key_a' "
                        "AND action = 'tool.called' AND time >= {since}",
    "audit_time": "SELECT id FROM audit_events WHERE time < {since} ORDER BY time LIMIT 100",
}


@pytest.mark.parametrize("index", sorted(FILTERS))
async def test_audit_filters_activity_and_pruning_are_index_scans(store: KeyStore, backend_url: str,
                                                                  db_path: Path, index: str) -> None:
    await store.append_audit([event()])
    if backend_url:
        sql = FILTERS[index].format(ws="'acme'", since="now()").replace("time", '"time"')
        con = await asyncpg.connect(backend_url)
        try:
            # A table this small is cheaper to read whole; the question is whether the index can
            # serve the query at all.
            await con.execute("SET enable_seqscan = off")
            plan = "\n".join(row[0] for row in await con.fetch("EXPLAIN " + sql))
        finally:
            await con.close()
    else:
        sql = FILTERS[index].format(ws="'acme'", since="'2030-01-01T00:00:00.000Z'")
        with sqlite3.connect(db_path) as sqlite_con:
            plan = "\n".join(str(row[-1]) for row in sqlite_con.execute("EXPLAIN QUERY PLAN " + sql))
    assert index in plan, plan


# ---- upgrading a database that has audit rows ------------------------------------------------------


def steps_before_retention(migrations: tuple[str, ...], marker: str) -> tuple[str, ...]:
    """The released migration steps before the one that brought audit retention."""
    return migrations[:next(n for n, script in enumerate(migrations) if marker in script)]


@pytest.mark.sqlite_only
async def test_upgrading_a_sqlite_file_keeps_its_events_and_makes_old_ones_prunable(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as con:
        steps = steps_before_retention(sqlite.MIGRATIONS, "audit_no_delete_recent")
        for script in steps:
            for statement in _split_sql(script):
                con.execute(statement)
        con.execute(f"PRAGMA user_version = {len(steps)}")
        old = (datetime.now(UTC) - timedelta(days=400)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        con.execute("INSERT INTO audit_events (time, action, actor, workspace, details) "
                    "VALUES (?, 'key.created', 'cli', 'acme', '{}')", (old,))
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM audit_events")
    store = SQLiteKeyStore(db_path)
    await store.open()
    try:
        assert len(await everything(store)) == 1
        assert await store.prune_audit(days_ago(90), 100) == 1
        assert await everything(store) == []
    finally:
        await store.close()


async def test_upgrading_a_postgresql_schema_keeps_its_events_and_makes_old_ones_prunable(pg_url: str) -> None:
    con = await asyncpg.connect(pg_url)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                              "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            steps = steps_before_retention(postgres.MIGRATIONS, "audit_events_keep_recent")
            for number, script in enumerate(steps, start=1):
                await con.execute(script)
                await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        await con.execute("INSERT INTO audit_events (\"time\", action, actor, workspace, details) "
                          "VALUES (now() - interval '400 days', 'key.created', 'cli', 'acme', '{}')")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await con.execute("DELETE FROM audit_events")
    finally:
        await con.close()
    store = PostgresKeyStore(pg_url)
    await store.open()
    try:
        assert len(await everything(store)) == 1
        assert await store.prune_audit(days_ago(90), 100) == 1
        assert await everything(store) == []
    finally:
        await store.close()
