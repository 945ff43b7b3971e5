"""The key stores (docs/operations.md, Storage): keys, status changes with their audit row in one
transaction, append-only audit, change detection. The behaviour tests run on both backends (a
real SQLite file, a real PostgreSQL schema); those about the SQLite file itself (schema version,
WAL, file modes, another connection) run on SQLite only."""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.keys.records import DISABLED, ENABLED, from_rfc3339, to_rfc3339
from sidecar.keys.store.base import DuplicateLookupId, DuplicateName, KeyStore, StoreError
from sidecar.keys.store.sqlite import MIGRATIONS, SQLiteKeyStore
from tests.support.records import T0, audit_record, key_record


def _sql(path: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as con:
        return list(con.execute(query).fetchall())


@pytest.mark.sqlite_only
async def test_open_creates_the_schema_in_wal_mode_with_a_private_file(store: KeyStore, db_path: Path) -> None:
    assert _sql(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert _sql(db_path, "PRAGMA journal_mode") == [("wal",)]
    tables = {row[0] for row in _sql(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"keys", "audit_events", "counters"} <= tables
    await store.ping()


@pytest.mark.sqlite_only
def test_database_file_is_private(db_path: Path, store: KeyStore) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


@pytest.mark.sqlite_only
async def test_reopening_keeps_data_and_does_not_migrate_again(store: KeyStore, db_path: Path) -> None:
    await store.insert_key(key_record(1), [audit_record("key.created", key_record(1))])
    await store.close()
    again = SQLiteKeyStore(db_path)
    await again.open()
    try:
        assert (await again.get_key(key_record(1).id)) is not None
        assert _sql(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    finally:
        await again.close()


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as con:
        con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SQLiteKeyStore(db_path)
    with pytest.raises(StoreError, match="newer"):
        await store.open()


async def test_store_refuses_work_when_not_open(db_path: Path) -> None:
    with pytest.raises(StoreError):
        await SQLiteKeyStore(db_path).get_key("key_x")


async def test_inserted_key_reads_back_by_id_and_lookup_id(store: KeyStore) -> None:
    record = replace(key_record(1), roles=("viewer", "writer"), expires_at=T0 + timedelta(days=1))
    stored = await store.insert_key(record, [audit_record("key.created", record)])
    assert stored.revision > 0
    by_id = await store.get_key(record.id)
    by_lookup = await store.get_by_lookup_id(record.lookup_id)
    assert by_id == by_lookup == stored
    assert by_id is not None
    assert by_id.roles == ("viewer", "writer")
    assert by_id.created_at == record.created_at
    assert by_id.expires_at == record.expires_at
    assert await store.get_key("key_missing") is None
    assert await store.get_by_lookup_id("NOPE0000") is None


async def test_names_are_unique_per_workspace_only(store: KeyStore) -> None:
    await store.insert_key(key_record(1, name="ci"), [])
    with pytest.raises(DuplicateName):
        await store.insert_key(key_record(2, name="ci"), [])
    await store.insert_key(key_record(3, name="ci", workspace="globex"), [])
    assert [k.name for k in await store.list_keys("acme")] == ["ci"]
    assert [k.workspace for k in await store.list_keys("globex")] == ["globex"]


async def test_duplicate_lookup_id_is_its_own_error_and_writes_nothing(store: KeyStore) -> None:
    await store.insert_key(key_record(1, lookup="SAMELOOK"), [])
    with pytest.raises(DuplicateLookupId):
        await store.insert_key(key_record(2, lookup="SAMELOOK"), [audit_record("key.created", key_record(2))])
    assert await store.get_key(key_record(2).id) is None
    assert await store.list_audit("acme", 10, None) == []


async def test_list_keys_is_in_creation_order(store: KeyStore) -> None:
    for n in (3, 1, 2):
        await store.insert_key(key_record(n), [])
    assert [k.id for k in await store.list_keys("acme")] == [key_record(n).id for n in (1, 2, 3)]


async def test_disable_and_enable_change_status_times_and_write_the_audit_row(store: KeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    disabled = await store.set_status(record.id, DISABLED, T0, audit_record("key.disabled", record))
    assert disabled is not None
    assert disabled.status == DISABLED
    assert disabled.disabled_at == T0
    assert disabled.revision > record.revision
    again = await store.set_status(record.id, DISABLED, T0 + timedelta(hours=1), audit_record("key.disabled", record))
    assert again is not None
    assert again.disabled_at == T0  # the first disable time is kept
    enabled = await store.set_status(record.id, ENABLED, T0, audit_record("key.enabled", record))
    assert enabled is not None
    assert enabled.status == ENABLED
    assert enabled.disabled_at is None
    assert enabled.key_hash == record.key_hash  # same value works again
    actions = [e.action for e in await store.list_audit("acme", 10, None)]
    assert actions == ["key.enabled", "key.disabled", "key.disabled"]


async def test_status_change_of_unknown_key_returns_none_and_writes_no_audit(store: KeyStore) -> None:
    assert await store.set_status("key_missing", DISABLED, T0, audit_record("key.disabled")) is None
    assert await store.list_audit("acme", 10, None) == []


@pytest.mark.sqlite_only
async def test_audit_is_append_only(store: KeyStore, db_path: Path) -> None:
    await store.append_audit([audit_record("admin.login")])
    with sqlite3.connect(db_path) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE audit_events SET actor = 'mallory'")
    with sqlite3.connect(db_path) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM audit_events")
    assert len(await store.list_audit("acme", 10, None)) == 1


async def test_audit_lists_newest_first_per_workspace_with_paging(store: KeyStore) -> None:
    await store.append_audit([audit_record(f"e{n}", when=T0 + timedelta(seconds=n)) for n in range(5)])
    await store.append_audit([replace(audit_record("other"), workspace="globex")])
    page = await store.list_audit("acme", 2, None)
    assert [e.action for e in page] == ["e4", "e3"]
    assert page[0].details == {"n": 1}
    assert page[0].time == T0 + timedelta(seconds=4)
    assert page[1].id is not None
    rest = await store.list_audit("acme", 10, page[1].id)
    assert [e.action for e in rest] == ["e2", "e1", "e0"]
    assert page[0].as_json()["time"] == "2030-01-02T03:04:09.678Z"


async def test_last_used_keeps_the_newest_time(store: KeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    await store.touch_last_used({record.id: T0 + timedelta(minutes=5)})
    await store.touch_last_used({record.id: T0})  # an older batch (another replica) loses
    stored = await store.get_key(record.id)
    assert stored is not None
    assert stored.last_used_at == T0 + timedelta(minutes=5)


async def test_update_hash_replaces_the_stored_hash(store: KeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    await store.update_hash(record.id, "$argon2id$new")
    stored = await store.get_key(record.id)
    assert stored is not None
    assert stored.key_hash == "$argon2id$new"


async def test_changes_since_returns_only_newer_revisions(store: KeyStore) -> None:
    first = await store.insert_key(key_record(1), [])
    newest, changed = await store.changes_since(first.revision)
    assert (newest, changed) == (first.revision, [])
    second = await store.insert_key(key_record(2), [])
    disabled = await store.set_status(first.id, DISABLED, T0, audit_record("key.disabled", first))
    assert disabled is not None
    newest, changed = await store.changes_since(first.revision)
    assert newest == disabled.revision
    assert [k.id for k in changed] == [second.id, first.id]
    assert changed[1].status == DISABLED


@pytest.mark.sqlite_only
async def test_change_marker_moves_only_for_commits_by_another_connection(
        store: KeyStore, db_path: Path) -> None:
    before = await store.external_change_marker()
    await store.insert_key(key_record(1), [])
    assert await store.external_change_marker() == before
    other = SQLiteKeyStore(db_path)  # e.g. the CLI in another process
    await other.open()
    try:
        await other.set_status(key_record(1).id, DISABLED, T0, audit_record("key.disabled", key_record(1)))
    finally:
        await other.close()
    assert await store.external_change_marker() != before
    _, changed = await store.changes_since(0)
    assert [k.status for k in changed] == [DISABLED]


async def test_scheduled_disable_is_due_only_after_its_time(store: KeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    await store.schedule_disable(record.id, T0)
    assert await store.due_scheduled_disables(T0 - timedelta(seconds=1)) == []
    assert [k.id for k in await store.due_scheduled_disables(T0)] == [record.id]
    await store.set_status(record.id, ENABLED, T0, audit_record("key.enabled", record))  # clears it
    assert await store.due_scheduled_disables(T0 + timedelta(days=1)) == []


async def test_count_by_status_counts_one_workspace(store: KeyStore) -> None:
    for n in range(3):
        await store.insert_key(key_record(n), [])
    await store.insert_key(key_record(9, workspace="globex"), [])
    await store.set_status(key_record(0).id, DISABLED, T0, audit_record("key.disabled", key_record(0)))
    assert await store.count_by_status("acme") == {ENABLED: 2, DISABLED: 1}


@pytest.mark.sqlite_only
async def test_no_key_hash_or_secret_column_leaks_into_audit(store: KeyStore, db_path: Path) -> None:
    record = await store.insert_key(key_record(1), [audit_record("key.created", key_record(1))])
    rows = _sql(db_path, "SELECT * FROM audit_events")
    assert rows
    assert all(record.key_hash not in str(row) for row in rows)


def test_rfc3339_round_trip_is_utc_with_z() -> None:
    text = to_rfc3339(T0)
    assert text == "2030-01-02T03:04:05.678Z"
    assert from_rfc3339(text) == T0
    assert to_rfc3339(None) is None
    assert from_rfc3339(None) is None
