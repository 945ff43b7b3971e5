"""A key's own rate limit (docs/reference/limits.md, A key's own limit) in the stores and the key
manager, on both backends: the migration that brings the column, create / update / rotate with
their audit events, the revision every process's cache follows, and ``store copy``."""

from __future__ import annotations

import io
import sqlite3
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from sidecar.gate.principal import Principal
from sidecar.keys.audit import KEY_UPDATED, AuditLog
from sidecar.keys.errors import InvalidInput, KeyNotFound
from sidecar.keys.format import KeyHasher
from sidecar.keys.manager import KeyManager, key_json
from sidecar.keys.records import KeyRecord, to_rfc3339
from sidecar.keys.store import postgres, sqlite
from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.copy import copy_store
from sidecar.keys.store.sqlite import SQLiteKeyStore, _split_sql
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import RateLimit, Settings
from tests.keys.conftest import new_store
from tests.support.config import ConfigFactory
from tests.support.records import audit_record, key_record

pytestmark = pytest.mark.asyncio

# viewer: 600/minute; writer: no limit of its own (unlimited); org-admin as the base config.
ROLE_LIMITS = {"roles": {"viewer": {"rate_limit": "600/minute"}}}


def _settings(tmp_path: Path) -> Settings:
    return ConfigFactory(tmp_path).settings(ROLE_LIMITS)


def _manager(settings: Settings, store: KeyStore, changed: list[KeyRecord]) -> KeyManager:
    audit = AuditLog(store, JsonLog(stream=io.StringIO()), Metrics(CollectorRegistry()), settings.workspace)
    return KeyManager(settings, store, KeyHasher(settings.argon2), audit, on_change=changed.append)


# ---- the migration -----------------------------------------------------------------------------


async def test_upgrading_a_database_keeps_its_keys_and_gives_them_their_roles_limit(
        backend_url: str, db_path: Path) -> None:
    """A database made by the previous release (every migration step but the last) holds a key;
    after the upgrade the key is intact and has no limit of its own (rate_limit NULL)."""
    steps_sqlite, steps_pg = sqlite.MIGRATIONS[:-1], postgres.MIGRATIONS[:-1]
    assert "rate_limit" in sqlite.MIGRATIONS[-1] and "rate_limit" in postgres.MIGRATIONS[-1]
    row = ("key_0000000000000001", "LOOK0001", "old-key", "acme", "enabled", "$argon2id$fake1",
           "2030-01-02T03:04:05.678Z", "test", 7)
    if not backend_url:
        db_path.parent.mkdir(parents=True)
        with sqlite3.connect(db_path) as lite:
            for script in steps_sqlite:
                for statement in _split_sql(script):
                    lite.execute(statement)
            lite.execute(f"PRAGMA user_version = {len(steps_sqlite)}")
            lite.execute("INSERT INTO keys (id, lookup_id, name, roles, workspace, status, key_hash, created_at, "
                        "created_by, revision) VALUES (?, ?, ?, '[\"viewer\"]', ?, ?, ?, ?, ?, ?)", row)
    else:
        con = await asyncpg.connect(backend_url)
        try:
            async with con.transaction():
                await con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                                  "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
                for number, script in enumerate(steps_pg, start=1):
                    await con.execute(script)
                    await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
                await con.execute(
                    "INSERT INTO keys (id, lookup_id, name, roles, workspace, status, key_hash, created_at, "
                    "created_by, revision) VALUES ($1, $2, $3, '{viewer}', $4, $5, $6, $7::text::timestamptz, "
                    "$8, $9)", *row)
        finally:
            await con.close()
    store = new_store(backend_url, db_path)
    assert await store.migrate() == 1
    await store.open()
    try:
        record = await store.get_key("key_0000000000000001")
        assert record is not None
        assert (record.name, record.roles, record.status, record.revision) == ("old-key", ("viewer",), "enabled", 7)
        assert to_rfc3339(record.created_at) == "2030-01-02T03:04:05.678Z"
        assert record.rate_limit is None
        # And the column works from now on.
        updated = await store.set_rate_limit(record.id, "5/second", audit_record(KEY_UPDATED, record))
        assert updated is not None and updated.rate_limit == "5/second"
    finally:
        await store.close()


# ---- the store ---------------------------------------------------------------------------------


async def test_a_stored_rate_limit_reads_back_by_every_lookup(store: KeyStore) -> None:
    own = replace(key_record(1), rate_limit="100/hour")
    await store.insert_key(own, [])
    await store.insert_key(key_record(2), [])
    assert (await store.get_key(own.id)).rate_limit == "100/hour"  # type: ignore[union-attr]
    assert (await store.get_by_lookup_id(own.lookup_id)).rate_limit == "100/hour"  # type: ignore[union-attr]
    assert [k.rate_limit for k in await store.list_keys("acme")] == ["100/hour", None]
    assert [k.rate_limit for k in await store.all_keys()] == ["100/hour", None]


async def test_changing_a_rate_limit_bumps_the_revision_and_writes_its_audit_row(store: KeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    before, _ = await store.changes_since(0)
    event = audit_record(KEY_UPDATED, record)
    updated = await store.set_rate_limit(record.id, "unlimited", event)
    assert updated is not None
    assert updated.rate_limit == "unlimited"
    assert updated.revision > record.revision
    # Another process following the revision sees exactly this key change.
    newest, changed = await store.changes_since(before)
    assert newest == updated.revision
    assert [(k.id, k.rate_limit) for k in changed] == [(record.id, "unlimited")]
    assert [e.action for e in await store.list_audit("acme", 10, None)] == [KEY_UPDATED]
    # Back to the roles' limit.
    again = await store.set_rate_limit(record.id, None, event)
    assert again is not None and again.rate_limit is None and again.revision > updated.revision


async def test_changing_the_rate_limit_of_a_missing_key_writes_nothing(store: KeyStore) -> None:
    before, _ = await store.changes_since(0)
    assert await store.set_rate_limit("key_nope", "1/second", audit_record(KEY_UPDATED)) is None
    assert await store.list_audit("acme", 10, None) == []
    assert (await store.changes_since(0))[0] == before


async def test_store_copy_carries_each_keys_own_limit(store: KeyStore, tmp_path: Path) -> None:
    source = SQLiteKeyStore(tmp_path / "source" / "sidecar.db")
    await source.open()
    try:
        record = await source.insert_key(key_record(1), [])
        await source.insert_key(key_record(2), [])
        await source.set_rate_limit(record.id, "30/minute", audit_record(KEY_UPDATED, record))
        report = await copy_store(source, store)
        assert report.keys_copied == 2
        assert {k.id: k.rate_limit for k in await store.all_keys()} == {record.id: "30/minute",
                                                                      key_record(2).id: None}
        # A second copy finds the same keys, limits included: nothing differs, nothing is copied.
        again = await copy_store(source, store)
        assert (again.keys_copied, again.keys_already_there) == (0, 2)
    finally:
        await source.close()


# ---- the key manager -----------------------------------------------------------------------------


async def test_create_keeps_a_canonical_own_limit_and_the_key_json_says_where_the_limit_comes_from(
        store: KeyStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    manager = _manager(settings, store, [])
    own, _ = await manager.create(name="own", roles=["viewer"], rate_limit="100/second", actor="cli", client=None)
    free, _ = await manager.create(name="free", roles=["viewer"], rate_limit="unlimited", actor="cli", client=None)
    roles, _ = await manager.create(name="roles", roles=["viewer"], actor="cli", client=None)
    assert [(await store.get_key(r.id)).rate_limit for r in (own, free, roles)] == [  # type: ignore[union-attr]
        "100/second", "unlimited", None]
    shown = [key_json(r, settings) for r in (own, free, roles)]
    assert [(k["rate_limit"], k["effective_rate_limit"], k["rate_limit_source"]) for k in shown] == [
        ("100/second", "100/second", "key"), ("unlimited", "unlimited", "key"), (None, "600/minute", "roles")]
    created = await store.list_audit("acme", 10, None, action="key.created")
    assert sorted(e.details["rate_limit"] for e in created if e.details["rate_limit"]) == ["100/second", "unlimited"]
    # What the proxy enforces follows the same record.
    assert [Principal.from_record(r, settings).rate_limit for r in (own, free, roles)] == [
        RateLimit(100, "second"), None, RateLimit(600, "minute")]


@pytest.mark.parametrize("value", ["0/second", "10/day", "10 / minute", "ten/minute", "", "UNLIMITED",
                                   "1000000000/hour", 10, ["1/second"], True])
async def test_a_bad_rate_limit_is_refused_naming_the_field(store: KeyStore, tmp_path: Path, value: object) -> None:
    manager = _manager(_settings(tmp_path), store, [])
    with pytest.raises(InvalidInput) as refused:
        await manager.create(name="k", roles=["viewer"], rate_limit=value, actor="cli", client=None)
    assert (refused.value.code, refused.value.field) == ("invalid_rate_limit", "rate_limit")
    assert await store.list_keys("acme") == []
    record, _ = await manager.create(name="k", roles=["viewer"], actor="cli", client=None)
    with pytest.raises(InvalidInput) as refused:
        await manager.set_rate_limit(record.id, value, actor="ops", client="127.0.0.1")
    assert refused.value.field == "rate_limit"
    assert (await store.get_key(record.id)).rate_limit is None  # type: ignore[union-attr]


async def test_an_update_is_audited_with_from_and_to_and_reaches_the_caches(store: KeyStore, tmp_path: Path) -> None:
    changed: list[KeyRecord] = []
    manager = _manager(_settings(tmp_path), store, changed)
    record, _ = await manager.create(name="agent", roles=["viewer"], actor="cli", client=None)
    first = await manager.set_rate_limit(record.id, "20/second", actor="ops", client="127.0.0.1")
    second = await manager.set_rate_limit(record.id, None, actor="ops", client="127.0.0.1")
    assert (first.rate_limit, second.rate_limit) == ("20/second", None)
    # Each change went through the same path as a disable: the running proxy forgets the key.
    assert [(r.id, r.rate_limit, r.revision) for r in changed] == [
        (record.id, "20/second", first.revision), (record.id, None, second.revision)]
    events = await store.list_audit("acme", 10, None, action=KEY_UPDATED)
    assert [(e.actor, e.client, e.key_id, e.key_name, e.details) for e in events] == [
        ("ops", "127.0.0.1", record.id, "agent", {"rate_limit": {"from": "20/second", "to": None}}),
        ("ops", "127.0.0.1", record.id, "agent", {"rate_limit": {"from": None, "to": "20/second"}}),
    ]


async def test_setting_the_limit_a_key_already_has_changes_nothing(store: KeyStore, tmp_path: Path) -> None:
    changed: list[KeyRecord] = []
    manager = _manager(_settings(tmp_path), store, changed)
    record, _ = await manager.create(name="agent", roles=["viewer"], rate_limit="5/minute", actor="cli", client=None)
    same = await manager.set_rate_limit(record.id, "5/minute", actor="ops", client=None)
    assert same.revision == record.revision
    assert changed == []
    assert await store.list_audit("acme", 10, None, action=KEY_UPDATED) == []


async def test_another_workspaces_key_is_not_found(store: KeyStore, tmp_path: Path) -> None:
    manager = _manager(_settings(tmp_path), store, [])
    other = await store.insert_key(key_record(1, workspace="globex"), [])
    with pytest.raises(KeyNotFound):
        await manager.set_rate_limit(other.id, "1/second", actor="ops", client=None)
    with pytest.raises(KeyNotFound):
        await manager.set_rate_limit("key_missing", "1/second", actor="ops", client=None)
    assert (await store.get_key(other.id)).rate_limit is None  # type: ignore[union-attr]


async def test_a_rotated_key_keeps_its_own_limit(store: KeyStore, tmp_path: Path) -> None:
    manager = _manager(_settings(tmp_path), store, [])
    old, _ = await manager.create(name="agent", roles=["viewer"], rate_limit="7/second", actor="cli", client=None)
    new, _, _ = await manager.rotate(old.id, name="agent-2", actor="ops", client=None)
    assert new.rate_limit == "7/second"
