"""The PostgreSQL key store against a real server: what several replicas sharing one database
need beyond the behaviours both stores share (those run on both in tests/keys/test_store.py):
migrations under a lock, session bindings and shared secrets that hold under races, the NOTIFY
change feed, no password in error text.

Test bodies use the KeyStore interface through the ``store`` fixture and ``replica`` (another
process sharing the same data); raw SQL only where the database itself is what is tested.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from sidecar.keys.records import DISABLED, ENABLED
from sidecar.keys.store.base import StoreError
from sidecar.keys.store.postgres import MIGRATIONS, KeyChangeFeed, PostgresKeyStore, redact_url
from tests.support.polling import eventually
from tests.support.records import T0, audit_record, key_record

PASSWORD = "Sw0rdf1sh-not-for-logs"

Replica = Callable[[], Awaitable[PostgresKeyStore]]


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, hosts = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{hosts}"))


@pytest.fixture
async def replica(pg_url: str) -> AsyncIterator[Replica]:
    """Opens another store on the same data, as another replica or the CLI would."""
    opened: list[PostgresKeyStore] = []

    async def open_replica() -> PostgresKeyStore:
        other = PostgresKeyStore(pg_url)
        await other.open()
        opened.append(other)
        return other

    try:
        yield open_replica
    finally:
        for other in opened:
            await other.close()


@pytest.fixture
async def store(replica: Replica) -> PostgresKeyStore:
    return await replica()


@pytest.fixture
async def raw(pg_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection to the test schema, for checks the database itself must enforce."""
    con = await asyncpg.connect(pg_url)
    try:
        yield con
    finally:
        await con.close()


RefuseConnections = Callable[[], AbstractAsyncContextManager[None]]


@pytest.fixture
def refuse_connections(pg_server: str, pg_database: str) -> RefuseConnections:
    """While entered, the test database accepts no new connection (open ones stay): a database
    that went away, as far as anyone reconnecting can tell."""
    database = urlsplit(pg_database).path.lstrip("/")

    @asynccontextmanager
    async def refusing() -> AsyncIterator[None]:
        admin = await asyncpg.connect(pg_server)  # the server's maintenance database
        try:
            await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            try:
                yield
            finally:
                await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
        finally:
            await admin.close()

    return refusing


# -- schema and migrations -------------------------------------------------------------------------


async def test_open_creates_the_schema_and_records_each_migration(
        store: PostgresKeyStore, raw: asyncpg.Connection[asyncpg.Record]) -> None:
    versions = [r[0] for r in await raw.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    tables = {r[0] for r in await raw.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    assert {"keys", "audit_events", "counters", "session_bindings", "shared_settings"} <= tables
    await store.ping()


async def test_migrating_again_applies_nothing_and_keeps_data(store: PostgresKeyStore, replica: Replica) -> None:
    await store.insert_key(key_record(1), [audit_record("key.created", key_record(1))])
    assert await store.migrate() == 0
    await store.close()
    again = await replica()
    assert await again.get_key(key_record(1).id) is not None
    assert await again.migrate() == 0


async def test_replicas_starting_together_migrate_once(pg_url: str, raw: asyncpg.Connection[asyncpg.Record]) -> None:
    stores = [PostgresKeyStore(pg_url) for _ in range(5)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(applied) == [0, 0, 0, 0, len(MIGRATIONS)]
        await asyncio.gather(*(s.open() for s in stores))
        assert await raw.fetchval("SELECT COUNT(*) FROM schema_migrations") == len(MIGRATIONS)
        await stores[0].insert_key(key_record(1), [])
        assert await stores[4].get_key(key_record(1).id) is not None
    finally:
        for s in stores:
            await s.close()


async def test_a_newer_schema_is_refused(store: PostgresKeyStore, raw: asyncpg.Connection[asyncpg.Record],
                                         pg_url: str) -> None:
    await raw.execute("INSERT INTO schema_migrations (version) VALUES ($1)", len(MIGRATIONS) + 1)
    with pytest.raises(StoreError, match="newer"):
        await PostgresKeyStore(pg_url).open()


async def test_store_refuses_work_when_not_open(pg_url: str) -> None:
    with pytest.raises(StoreError):
        await PostgresKeyStore(pg_url).get_key("key_x")


# -- keys ------------------------------------------------------------------------------------------


async def test_times_are_kept_to_the_millisecond_in_utc(store: PostgresKeyStore) -> None:
    local = datetime(2030, 1, 2, 5, 4, 5, 678999, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    record = replace(key_record(1), created_at=local)
    await store.insert_key(record, [])
    stored = await store.get_key(record.id)
    assert stored is not None
    assert stored.created_at == datetime(2030, 1, 2, 5, 4, 5, 678000, tzinfo=UTC)
    assert stored.created_at.tzinfo == UTC


async def test_scheduled_disable_is_due_only_after_its_time_and_enable_clears_it(store: PostgresKeyStore) -> None:
    record = await store.insert_key(key_record(1), [])
    await store.schedule_disable(record.id, T0)
    scheduled = await store.get_key(record.id)
    assert scheduled is not None
    assert scheduled.disable_at == T0
    assert scheduled.revision > record.revision
    assert await store.due_scheduled_disables(T0 - timedelta(seconds=1)) == []
    assert [k.id for k in await store.due_scheduled_disables(T0)] == [record.id]
    await store.set_status(record.id, ENABLED, T0, audit_record("key.enabled", record))  # clears it
    assert await store.due_scheduled_disables(T0 + timedelta(days=1)) == []
    await store.schedule_disable(record.id, T0)
    await store.set_status(record.id, DISABLED, T0, audit_record("key.disabled", record))  # so does disabling
    assert await store.due_scheduled_disables(T0 + timedelta(days=1)) == []


async def test_an_expiry_is_noted_once_across_replicas(store: PostgresKeyStore, replica: Replica) -> None:
    record = await store.insert_key(replace(key_record(1), expires_at=T0), [])
    await store.insert_key(replace(key_record(2), expires_at=T0 + timedelta(days=1)), [])
    assert await store.due_expiries(T0 - timedelta(seconds=1)) == []
    assert [k.id for k in await store.due_expiries(T0)] == [record.id]
    other = await replica()
    noted = await asyncio.gather(*(s.note_expired(record.id, audit_record("key.expired", record))
                                   for s in (store, other, store, other)))
    assert sorted(noted) == [False, False, False, True]
    assert [e.action for e in await store.list_audit("acme", 10, None)] == ["key.expired"]
    assert await store.due_expiries(T0 + timedelta(days=2)) == [await store.get_key(key_record(2).id)]


async def test_last_used_keeps_the_newest_time(store: PostgresKeyStore, replica: Replica) -> None:
    record = await store.insert_key(key_record(1), [])
    await store.touch_last_used({record.id: T0 + timedelta(minutes=5)})
    other = await replica()
    await other.touch_last_used({record.id: T0})  # an older batch from another replica loses
    await store.touch_last_used({})
    stored = await store.get_key(record.id)
    assert stored is not None
    assert stored.last_used_at == T0 + timedelta(minutes=5)
    assert stored.revision == record.revision  # last-used is not a key change


# -- audit -----------------------------------------------------------------------------------------


async def test_audit_is_append_only_in_the_database(
        store: PostgresKeyStore, raw: asyncpg.Connection[asyncpg.Record]) -> None:
    await store.append_audit([audit_record("admin.login")])
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events",
                      "TRUNCATE audit_events"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await raw.execute(statement)
    assert len(await store.list_audit("acme", 10, None)) == 1


async def test_no_key_hash_leaks_into_audit(store: PostgresKeyStore, raw: asyncpg.Connection[asyncpg.Record]) -> None:
    record = await store.insert_key(key_record(1), [audit_record("key.created", key_record(1))])
    rows = await raw.fetch("SELECT * FROM audit_events")
    assert rows
    assert all(record.key_hash not in str(tuple(row)) for row in rows)


# -- changes across replicas -----------------------------------------------------------------------


async def test_change_marker_moves_when_another_replica_commits(store: PostgresKeyStore, replica: Replica) -> None:
    await store.insert_key(key_record(1), [])
    before = await store.external_change_marker()
    other = await replica()  # e.g. the CLI, or another sidecar
    await other.set_status(key_record(1).id, DISABLED, T0, audit_record("key.disabled", key_record(1)))
    assert await store.external_change_marker() != before
    _, changed = await store.changes_since(before)
    assert [k.status for k in changed] == [DISABLED]


async def test_concurrent_writers_get_distinct_revisions_in_commit_order(
        store: PostgresKeyStore, replica: Replica) -> None:
    other = await replica()
    records = await asyncio.gather(*(s.insert_key(key_record(n), []) for n, s in
                                     enumerate([store, other] * 10)))
    assert sorted(r.revision for r in records) == list(range(1, 21))
    newest, changed = await store.changes_since(0)
    assert newest == 20
    assert [k.revision for k in changed] == list(range(1, 21))


async def test_listener_hears_a_change_when_it_commits_and_not_before(
        store: PostgresKeyStore, replica: Replica, raw: asyncpg.Connection[asyncpg.Record]) -> None:
    heard: list[int] = []
    feed = await store.listen(heard.append)
    assert heard == [0]  # on (re)connection: the current revision, so the caller resynchronises
    assert feed.connected
    assert feed.is_current(5.0)
    other = await replica()
    created = await other.insert_key(key_record(1), [audit_record("key.created", key_record(1))])
    await eventually(lambda: created.revision in heard)
    # A change is not announced while its transaction is open, and is once it commits.
    async with raw.transaction():
        revision = await raw.fetchval("UPDATE counters SET value = value + 1 WHERE name = 'revision' "
                                      "RETURNING value")
        await asyncio.sleep(0.3)
        assert revision not in heard
    await eventually(lambda: revision in heard)
    await feed.close()
    assert not feed.connected


async def test_listener_reconnects_and_resynchronises_after_its_connection_is_cut(
        pg_url: str, replica: Replica, raw: asyncpg.Connection[asyncpg.Record],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = PostgresKeyStore(_with_password(pg_url, PASSWORD))  # trust auth: the password is never asked
    await store.open()
    try:
        heard: list[int] = []
        feed = await store.listen(heard.append, heartbeat_seconds=0.2)
        pid = feed.backend_pid
        assert pid is not None
        other = await replica()
        assert await raw.fetchval("SELECT pg_terminate_backend($1)", pid)
        created = await other.insert_key(key_record(1), [])  # perhaps while the feed is away
        await eventually(lambda: feed.reconnects >= 1 and feed.connected and created.revision in heard)
        assert feed.backend_pid not in (None, pid)
        assert feed.is_current(5.0)
        changed = await other.set_status(created.id, DISABLED, T0, audit_record("key.disabled", created))
        assert changed is not None
        await eventually(lambda: changed.revision in heard)
    finally:
        await store.close()
    assert "lost" in caplog.text
    assert PASSWORD not in caplog.text


async def test_listener_is_stale_while_it_cannot_reconnect_and_recovers(
        store: PostgresKeyStore, replica: Replica, raw: asyncpg.Connection[asyncpg.Record],
        refuse_connections: RefuseConnections) -> None:
    heard: list[int] = []
    feed = await store.listen(heard.append, heartbeat_seconds=0.1)
    assert isinstance(feed, KeyChangeFeed)
    assert feed.is_current(1.0)
    other = await replica()
    async with refuse_connections():
        await raw.fetchval("SELECT pg_terminate_backend($1)", feed.backend_pid)
        await eventually(lambda: not feed.connected)
        await asyncio.sleep(0.5)
        assert not feed.is_current(0.3)
        created = await other.insert_key(key_record(1), [])  # a pooled connection is still open
    await eventually(lambda: feed.is_current(1.0) and created.revision in heard)


# -- MCP session bindings --------------------------------------------------------------------------


async def test_a_session_binding_is_never_moved_to_another_key(store: PostgresKeyStore) -> None:
    assert await store.session_owner("sess-1") is None
    assert await store.bind_session("sess-1", "key_a", T0) == "key_a"
    assert await store.bind_session("sess-1", "key_b", T0) == "key_a"
    assert await store.bind_session("sess-1", "key_a", T0) == "key_a"
    assert await store.session_owner("sess-1") == "key_a"


async def test_concurrent_binds_from_two_keys_on_two_replicas_agree_on_one_owner(
        store: PostgresKeyStore, replica: Replica) -> None:
    other = await replica()
    for n in range(10):
        session = f"race-{n}"
        owners = await asyncio.gather(*(s.bind_session(session, key, T0) for s, key in
                                        [(store, "key_a"), (other, "key_b")] * 4))
        assert len(set(owners)) == 1
        assert await other.session_owner(session) == owners[0]


async def test_bindings_survive_a_restart_and_unused_ones_are_pruned(store: PostgresKeyStore,
                                                                      replica: Replica) -> None:
    await store.bind_session("old", "key_a", T0)
    await store.bind_session("busy", "key_a", T0)
    await store.touch_sessions({"busy": T0 + timedelta(hours=2), "unknown": T0})
    await store.touch_sessions({"busy": T0 + timedelta(hours=1)})  # older: kept newest
    await store.touch_sessions({})
    await store.close()
    restarted = await replica()
    assert await restarted.session_owner("old") == "key_a"
    assert await restarted.prune_sessions(T0 + timedelta(hours=1, minutes=30)) == 1
    assert await restarted.session_owner("old") is None
    assert await restarted.session_owner("busy") == "key_a"
    assert await restarted.bind_session("old", "key_b", T0) == "key_b"  # a pruned id is free again


# -- shared secrets --------------------------------------------------------------------------------


async def test_shared_secret_is_created_once_when_replicas_race(store: PostgresKeyStore, replica: Replica) -> None:
    other = await replica()
    made: list[str] = []

    def maker(label: str) -> Callable[[], str]:
        def make() -> str:
            made.append(label)
            return f"secret-{label}"
        return make

    values = await asyncio.gather(*(s.get_or_create_secret("signing_keys", maker(str(n)))
                                    for n, s in enumerate([store, other] * 5)))
    assert len(set(values)) == 1
    assert values[0] in {f"secret-{label}" for label in made}
    calls = len(made)
    assert await store.get_or_create_secret("signing_keys", maker("late")) == values[0]
    assert len(made) == calls  # an existing value is not remade
    assert await other.get_or_create_secret("other", maker("x")) == "secret-x"


# -- connection errors -----------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_connection_errors_never_show_the_password(pg_server: str, pg_url: str) -> None:
    port = urlsplit(pg_server).port
    urls = [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db",  # nothing listens
        _with_password(pg_url, PASSWORD).replace(urlsplit(pg_url).path, "/no_such_database_here"),
        f"postgresql://postgres@127.0.0.1:{port}/no_such_database_here?password={PASSWORD}",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db",  # the driver cannot parse it
    ]
    for url in urls:
        store = PostgresKeyStore(url, connect_timeout=2)
        assert PASSWORD not in repr(store)
        with pytest.raises(StoreError) as caught:
            await store.open()
        text = _error_text(caught.value)
        assert "***" in text
        assert PASSWORD not in text
    store = PostgresKeyStore(f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db", connect_timeout=2)
    with pytest.raises(StoreError) as caught:
        await store.listen(lambda _revision: None)
    assert PASSWORD not in _error_text(caught.value)


async def test_an_unreachable_database_is_a_store_error_without_the_password(
        pg_url: str, raw: asyncpg.Connection[asyncpg.Record], refuse_connections: RefuseConnections) -> None:
    store = PostgresKeyStore(_with_password(pg_url, PASSWORD))
    await store.open()
    try:
        async with refuse_connections():
            await raw.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            with pytest.raises(StoreError) as caught:
                await store.get_key("key_x")
            assert PASSWORD not in _error_text(caught.value)
            with pytest.raises(StoreError):
                await store.ping()
        assert await store.get_key("key_x") is None  # back: the pool connects again
    finally:
        await store.close()


def test_redacted_urls_keep_everything_but_the_password() -> None:
    assert redact_url("postgresql://app:p%40ss@db.internal:5432/toolio?sslmode=require") == (
        "postgresql://app:***@db.internal:5432/toolio?sslmode=require")
    assert redact_url("postgresql://app@db/toolio?password=x&sslpassword=y") == (
        "postgresql://app@db/toolio?password=***&sslpassword=***")
    assert redact_url("postgresql://db/toolio") == "postgresql://db/toolio"


# -- the test harness itself -----------------------------------------------------------------------


def test_a_throwaway_cluster_starts_when_no_server_answers(
        pg_throwaway_cluster: Callable[[], AbstractContextManager[str]]) -> None:
    """The fallback tests.support.postgres uses on a machine without a running server must keep working."""
    async def check(url: str) -> None:
        store = PostgresKeyStore(url)
        await store.open()
        try:
            await store.insert_key(key_record(1), [])
            assert [k.id for k in await store.list_keys("acme")] == [key_record(1).id]
        finally:
            await store.close()

    with pg_throwaway_cluster() as url:
        asyncio.run(check(url))
