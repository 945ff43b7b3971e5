"""The SQLite :class:`KeyStore`: one file, the embedded default for one replica and the demo.

Everything SQLite-specific stays in this module. SQLite runs in WAL mode with
``synchronous=FULL``: a key or audit row the API confirmed survives a crash or power loss.
``last_used_at`` is written in batches by the caller, never once per request.

Change detection for other processes (the CLI writing to the same file): every key change
bumps a ``revision`` counter; readers poll the cheap ``PRAGMA data_version`` and, when it moves,
fetch only the keys whose revision is newer than the last one seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from sidecar.keys.listing import KeyPage, KeyQuery, page_from_rows
from sidecar.keys.records import (
    DISABLED,
    ENABLED,
    AuditRecord,
    KeyRecord,
    ToolUsage,
    from_rfc3339,
    to_rfc3339,
    utcnow,
)
from sidecar.keys.store.base import TOOL_ACTIVITY_LIMIT, DuplicateLookupId, DuplicateName, KeyStore, StoreError

# ---------------------------------------------------------------------------------------------
# SQLite

# Versioned migrations, applied in order inside one transaction each; PRAGMA user_version is the
# schema version. Never edit a released step: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE keys (
        id            TEXT PRIMARY KEY,
        lookup_id     TEXT NOT NULL UNIQUE,
        name          TEXT NOT NULL,
        roles         TEXT NOT NULL,          -- JSON array
        workspace     TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
        key_hash      TEXT NOT NULL,          -- argon2id PHC string; the key itself is never stored
        created_at    TEXT NOT NULL,
        created_by    TEXT NOT NULL,
        last_used_at  TEXT,
        disabled_at   TEXT,
        expires_at    TEXT,
        disable_at    TEXT,
        revision      INTEGER NOT NULL,
        UNIQUE (workspace, name)
    );
    CREATE INDEX keys_revision ON keys (revision);
    CREATE INDEX keys_disable_at ON keys (disable_at) WHERE disable_at IS NOT NULL;
    CREATE TABLE audit_events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        time      TEXT NOT NULL,
        action    TEXT NOT NULL,
        actor     TEXT NOT NULL,
        workspace TEXT NOT NULL,
        key_id    TEXT,
        key_name  TEXT,
        client    TEXT,
        details   TEXT NOT NULL
    );
    CREATE INDEX audit_workspace_id ON audit_events (workspace, id);
    -- Append-only (docs/reference/admin-api.md): the database itself refuses edits of audit rows.
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters (name, value) VALUES ('revision', 0);
    """,
    """
    CREATE TABLE session_bindings (
        session_id TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL,
        created_at TEXT NOT NULL,
        seen_at    TEXT NOT NULL
    );
    CREATE INDEX session_bindings_seen ON session_bindings (seen_at);
    -- Set once the key.expired audit event of a key's expiry is written (exactly one per expiry).
    ALTER TABLE keys ADD COLUMN expiry_noted INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX keys_expires_at ON keys (expires_at) WHERE expires_at IS NOT NULL AND expiry_noted = 0;
    """,
    """
    -- Values every process sharing the store must agree on; first writer wins.
    CREATE TABLE shared_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    -- Audit retention (docs/operations.md, Audit retention): events older than
    -- audit.retention_days are pruned. The database still refuses every UPDATE, and the DELETE
    -- of an event younger than one day (the shortest retention), so only old rows can go.
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete_recent BEFORE DELETE ON audit_events
        WHEN OLD.time > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE INDEX audit_time ON audit_events (time);
    -- GET /admin/api/audit?action=&key_id= and a key's activity (docs/reference/admin-api.md).
    CREATE INDEX audit_workspace_action_id ON audit_events (workspace, action, id);
    CREATE INDEX audit_workspace_key_id ON audit_events (workspace, key_id, id);
    CREATE INDEX audit_tool_calls ON audit_events (workspace, key_id, time) WHERE action = 'tool.called';
    """,
    """
    -- Key listing pages are read in the order of these indexes (sidecar/keys/listing.py); by name
    -- it is the UNIQUE (workspace, name) index. A never-used key sorts as '' (before any time).
    CREATE INDEX IF NOT EXISTS keys_workspace_created ON keys (workspace, created_at, id);
    CREATE INDEX IF NOT EXISTS keys_workspace_last_used ON keys (workspace, COALESCE(last_used_at, ''), id);
    """,
    """
    -- A key's own rate limit, replacing its roles' (docs/reference/limits.md): "N/second",
    -- "N/minute", "N/hour" or "unlimited"; NULL (every key before this step): its roles'.
    ALTER TABLE keys ADD COLUMN rate_limit TEXT;
    """,
)

_KEY_COLUMNS = ("id, lookup_id, name, roles, workspace, status, key_hash, created_at, created_by, "
                "last_used_at, disabled_at, expires_at, disable_at, revision, rate_limit")


def _key_from_row(row: sqlite3.Row | tuple[Any, ...]) -> KeyRecord:
    (key_id, lookup_id, name, roles, workspace, status, key_hash, created_at, created_by,
     last_used_at, disabled_at, expires_at, disable_at, revision, rate_limit) = tuple(row)
    return KeyRecord(
        id=key_id, lookup_id=lookup_id, name=name, roles=tuple(json.loads(roles)), workspace=workspace,
        status=status, key_hash=key_hash, created_at=from_rfc3339(created_at) or datetime.now(UTC),
        created_by=created_by, last_used_at=from_rfc3339(last_used_at),
        disabled_at=from_rfc3339(disabled_at), expires_at=from_rfc3339(expires_at),
        disable_at=from_rfc3339(disable_at), revision=revision, rate_limit=rate_limit,
    )


def _key_params(record: KeyRecord, revision: int) -> tuple[Any, ...]:
    return (record.id, record.lookup_id, record.name, json.dumps(list(record.roles)),
            record.workspace, record.status, record.key_hash, to_rfc3339(record.created_at),
            record.created_by, to_rfc3339(record.last_used_at), to_rfc3339(record.disabled_at),
            to_rfc3339(record.expires_at), to_rfc3339(record.disable_at), revision, record.rate_limit)


# The sort columns of each listing order, exactly as the listing indexes (MIGRATIONS) spell them (SQLite
# uses an expression index only for the same expression).
_SORT_COLUMNS = {"name": ("name",), "created": ("created_at", "id"),
                 "last_used": ("COALESCE(last_used_at, '')", "id")}


def page_sql(query: KeyQuery) -> tuple[str, list[Any]]:
    """The statement and parameters that read one listing page (exposed for the query-plan test)."""
    columns = _SORT_COLUMNS[query.sort]
    where: list[str] = []
    params: list[Any] = []
    if query.workspace is not None:
        where.append("workspace = ?")
        params.append(query.workspace)
    elif query.sort == "name":
        columns = (*columns, "id")  # names repeat across workspaces: the id breaks ties
    if query.status is not None:
        where.append("status = ?")
        params.append(query.status)
    if query.role is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(keys.roles) WHERE json_each.value = ?)")
        params.append(query.role)
    if query.search is not None:
        # Names are ASCII (sidecar.keys.manager.NAME_RULE), so lower() folds all their case.
        where.append("instr(lower(name), ?) > 0")
        params.append(query.search.lower())
    if query.after is not None:
        seek = "<" if query.descending else ">"
        value = query.after.value or ""
        if len(columns) == 1:
            where.append(f"{columns[0]} {seek} ?")
            params.append(value)
        else:
            # Spelled out rather than as a row value: SQLite seeks an expression index only on
            # a plain comparison of its column (the first term), then filters the ties.
            first, tie = columns
            where.append(f"{first} {seek}= ? AND ({first} {seek} ? OR {tie} {seek} ?)")
            params.extend((value, value, query.after.key_id))
    order = ", ".join(f"{c} DESC" if query.descending else c for c in columns)
    params.append(query.limit + 1)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {_KEY_COLUMNS} FROM keys{condition} ORDER BY {order} LIMIT ?", params


def _audit_from_row(r: sqlite3.Row | tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(id=r[0], time=from_rfc3339(r[1]) or utcnow(), action=r[2], actor=r[3],
                       workspace=r[4], key_id=r[5], key_name=r[6], client=r[7], details=json.loads(r[8]))


def _audit_params(event: AuditRecord) -> tuple[Any, ...]:
    return (to_rfc3339(event.time), event.action, event.actor, event.workspace, event.key_id,
            event.key_name, event.client, json.dumps(dict(event.details), sort_keys=True))


# How long opening a new file keeps trying to switch it to WAL (see _enter_wal): the busy timeout.
WAL_SWITCH_SECONDS = 5.0

_AUDIT_INSERT = ("INSERT INTO audit_events (time, action, actor, workspace, key_id, key_name, client, "
                 "details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


async def _undo(db: aiosqlite.Connection) -> None:
    """ROLLBACK on the way out of a failed write. A failure of the ROLLBACK itself (the
    transaction already ended, as when a cancelled COMMIT still ran on aiosqlite's worker
    thread) must not replace the error being raised: a swallowed ``CancelledError`` would keep
    a cancelled background job looping and make shutdown wait for it forever."""
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")


async def _enter_wal(db: aiosqlite.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, retried for a while. On a new file, a process switching
    while another one switches too gets SQLITE_BUSY at once: the busy timeout does not cover a
    change of journal mode. That is two pods' init containers (``keys import``) starting
    together, or ``serve`` starting beside a CLI command."""
    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    while True:
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.02)


class SQLiteKeyStore(KeyStore):
    """One aiosqlite connection; an asyncio lock serialises transactions on it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self.description = f"SQLite at {path}"

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write transaction, serialised on this connection: BEGIN IMMEDIATE takes the write
        lock up front (no SQLITE_BUSY half-way); COMMIT on success, ROLLBACK on any exception.
        BEGIN is inside the ``try``: cancelled while waiting for it, the statement still runs on
        aiosqlite's thread, and the transaction it opens must be rolled back, not left open."""
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                yield
                await self.db.execute("COMMIT")
            except BaseException:
                await _undo(self.db)
                raise

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so that writers take the write
        # lock up front and never fail half-way with SQLITE_BUSY on upgrade.
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await _enter_wal(db)
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            await self._migrate(db)
        except BaseException:
            await db.close()
            raise
        self._db = db
        # The database and its WAL/shared-memory files hold key hashes: owner-only (the -wal and
        # -shm files otherwise follow the umask).
        for suffix in ("", "-wal", "-shm"):
            try:
                self._path.with_name(self._path.name + suffix).chmod(0o600)
            except OSError:  # pragma: no cover - absent yet, or a mount owned by someone else
                pass

    async def _migrate(self, db: aiosqlite.Connection) -> int:
        try:
            await db.execute("BEGIN IMMEDIATE")
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"database schema {version} is newer than this sidecar knows "
                                 f"({len(MIGRATIONS)}); upgrade the sidecar")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _split_sql(script):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except BaseException:
            await _undo(db)
            raise
        return len(MIGRATIONS) - version

    async def migrate(self) -> int:
        if self._db is not None:
            return 0  # open() applied them
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await _enter_wal(db)
            return await self._migrate(db)
        finally:
            await db.close()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> None:
        async with self.db.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def _next_revision(self) -> int:
        await self.db.execute("UPDATE counters SET value = value + 1 WHERE name = 'revision'")
        async with self.db.execute("SELECT value FROM counters WHERE name = 'revision'") as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def insert_key(self, record: KeyRecord, audit: Sequence[AuditRecord]) -> KeyRecord:
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                revision = await self._next_revision()
                await self.db.execute(
                    f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _key_params(record, revision))
                await self.db.executemany(_AUDIT_INSERT, [_audit_params(e) for e in audit])
                await self.db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                await _undo(self.db)
                if "lookup_id" in str(exc):
                    raise DuplicateLookupId(record.lookup_id) from None
                raise DuplicateName(record.name) from None
            except BaseException:
                await _undo(self.db)
                raise
        return replace(record, revision=revision)

    async def _fetch_one(self, sql: str, params: tuple[Any, ...]) -> KeyRecord | None:
        async with self.db.execute(sql, params) as cur:
            row = await cur.fetchone()
        return _key_from_row(row) if row is not None else None

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._fetch_one(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))

    async def get_by_lookup_id(self, lookup_id: str) -> KeyRecord | None:
        return await self._fetch_one(f"SELECT {_KEY_COLUMNS} FROM keys WHERE lookup_id = ?", (lookup_id,))

    async def get_key_by_name(self, workspace: str, name: str) -> KeyRecord | None:
        return await self._fetch_one(f"SELECT {_KEY_COLUMNS} FROM keys WHERE workspace = ? AND name = ?",
                                     (workspace, name))

    async def page_keys(self, query: KeyQuery) -> KeyPage:
        if query.matches_nothing:
            return KeyPage([], None)
        sql, params = page_sql(query)
        async with self.db.execute(sql, params) as cur:
            return page_from_rows([_key_from_row(row) for row in await cur.fetchall()], query)

    async def list_keys(self, workspace: str) -> list[KeyRecord]:
        async with self.db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE workspace = ? ORDER BY created_at, id", (workspace,)
        ) as cur:
            return [_key_from_row(row) for row in await cur.fetchall()]

    async def set_status(self, key_id: str, status: str, now: datetime,
                         audit: AuditRecord) -> KeyRecord | None:
        def statement(revision: int) -> tuple[str, tuple[Any, ...]]:
            if status == DISABLED:
                # Keep the first disable time when disabling twice.
                return ("UPDATE keys SET status = 'disabled', disabled_at = COALESCE("
                        "CASE WHEN status = 'disabled' THEN disabled_at END, ?), disable_at = NULL, "
                        "revision = ? WHERE id = ?", (to_rfc3339(now), revision, key_id))
            return ("UPDATE keys SET status = 'enabled', disabled_at = NULL, disable_at = NULL, "
                    "revision = ? WHERE id = ?", (revision, key_id))

        return await self._change_key(key_id, statement, audit)

    async def set_rate_limit(self, key_id: str, rate_limit: str | None,
                             audit: AuditRecord) -> KeyRecord | None:
        return await self._change_key(
            key_id, lambda revision: ("UPDATE keys SET rate_limit = ?, revision = ? WHERE id = ?",
                                      (rate_limit, revision, key_id)), audit)

    async def _change_key(self, key_id: str, statement: Callable[[int], tuple[str, tuple[Any, ...]]],
                          audit: AuditRecord) -> KeyRecord | None:
        """One change to a key in one transaction: a new store revision (the change feed's
        cursor), the UPDATE ``statement(revision)`` gives, and its audit event. None when there
        is no such key (nothing is written)."""
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                revision = await self._next_revision()
                cur = await self.db.execute(*statement(revision))
                if cur.rowcount == 0:
                    await self.db.execute("ROLLBACK")
                    return None
                await self.db.execute(_AUDIT_INSERT, _audit_params(audit))
                await self.db.execute("COMMIT")
            except BaseException:
                await _undo(self.db)
                raise
        return await self.get_key(key_id)

    async def schedule_disable(self, key_id: str, when: datetime | None) -> None:
        async with self._write():
            revision = await self._next_revision()
            await self.db.execute("UPDATE keys SET disable_at = ?, revision = ? WHERE id = ?",
                                  (to_rfc3339(when), revision, key_id))

    async def due_scheduled_disables(self, now: datetime) -> list[KeyRecord]:
        async with self.db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE disable_at IS NOT NULL AND disable_at <= ? "
            "AND status = 'enabled'", (to_rfc3339(now),)
        ) as cur:
            return [_key_from_row(row) for row in await cur.fetchall()]

    async def due_expiries(self, now: datetime) -> list[KeyRecord]:
        async with self.db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE expires_at IS NOT NULL AND expiry_noted = 0 "
            "AND expires_at <= ?", (to_rfc3339(now),)
        ) as cur:
            return [_key_from_row(row) for row in await cur.fetchall()]

    async def note_expired(self, key_id: str, audit: AuditRecord) -> bool:
        async with self._write():
            cur = await self.db.execute(
                "UPDATE keys SET expiry_noted = 1 WHERE id = ? AND expiry_noted = 0", (key_id,))
            noted = cur.rowcount > 0
            if noted:
                await self.db.execute(_AUDIT_INSERT, _audit_params(audit))
        return noted

    async def update_hash(self, key_id: str, key_hash: str) -> None:
        async with self._lock:
            await self.db.execute("UPDATE keys SET key_hash = ? WHERE id = ?", (key_hash, key_id))

    async def touch_last_used(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        async with self._write():
            # MAX keeps the newest time when several sidecars share the store.
            await self.db.executemany(
                "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, ''), ?) WHERE id = ?",
                [(to_rfc3339(when), key_id) for key_id, when in last_used.items()],
            )

    async def append_audit(self, events: Iterable[AuditRecord]) -> None:
        rows = [_audit_params(e) for e in events]
        if not rows:
            return
        async with self._write():
            await self.db.executemany(_AUDIT_INSERT, rows)

    async def list_audit(self, workspace: str, limit: int, before: int | None, *,
                         action: str | None = None, key_id: str | None = None) -> list[AuditRecord]:
        sql = ("SELECT id, time, action, actor, workspace, key_id, key_name, client, details "
               "FROM audit_events WHERE workspace = ?")
        params: list[Any] = [workspace]
        if action is not None:
            sql += " AND action = ?"
            params.append(action)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        if before is not None:
            sql += " AND id < ?"
            params.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        async with self.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [_audit_from_row(r) for r in rows]

    async def tool_activity(self, workspace: str, key_id: str, since: datetime) -> list[ToolUsage]:
        # The literal action matches the partial index audit_tool_calls (a bound value would not).
        async with self.db.execute(
            "SELECT json_extract(details, '$.tool') AS tool, "
            "SUM(json_extract(details, '$.outcome') = 'allowed'), "
            "SUM(json_extract(details, '$.outcome') = 'denied') "
            "FROM audit_events WHERE workspace = ? AND key_id = ? AND action = 'tool.called' AND time >= ? "
            "AND json_extract(details, '$.tool') IS NOT NULL GROUP BY tool ORDER BY COUNT(*) DESC, tool LIMIT ?",
            (workspace, key_id, to_rfc3339(since), TOOL_ACTIVITY_LIMIT),
        ) as cur:
            rows = await cur.fetchall()
        return [ToolUsage(str(tool), int(allowed), int(denied)) for tool, allowed, denied in rows]

    async def prune_audit(self, older_than: datetime, batch: int) -> int:
        # MIN(...): never ask for a row the audit_no_delete_recent trigger keeps, which would
        # refuse the whole batch.
        due = "time < MIN(?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day'))"
        cutoff = to_rfc3339(older_than)
        # Nothing due (the usual hourly case): no write transaction, so the file's write lock is
        # not taken from the CLI or another process for nothing.
        async with self.db.execute(f"SELECT 1 FROM audit_events WHERE {due} LIMIT 1", (cutoff,)) as cur:
            if await cur.fetchone() is None:
                return 0
        async with self._write():
            cur = await self.db.execute(
                f"DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE {due} "
                "ORDER BY time LIMIT ?)", (cutoff, batch))
            return int(cur.rowcount)

    async def changes_since(self, revision: int) -> tuple[int, list[KeyRecord]]:
        async with self.db.execute("SELECT value FROM counters WHERE name = 'revision'") as cur:
            row = await cur.fetchone()
        newest = int(row[0]) if row else 0
        if newest <= revision:
            return newest, []
        async with self.db.execute(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE revision > ? ORDER BY revision", (revision,)
        ) as cur:
            return newest, [_key_from_row(r) for r in await cur.fetchall()]

    async def external_change_marker(self) -> int:
        # https://sqlite.org/pragma.html#pragma_data_version: changes when *another* connection
        # commits, and costs no disk read.
        async with self.db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count_by_status(self, workspace: str | None) -> dict[str, int]:
        async with self.db.execute(
            "SELECT status, COUNT(*) FROM keys WHERE ? IS NULL OR workspace = ? GROUP BY status",
            (workspace, workspace)
        ) as cur:
            counts = {ENABLED: 0, DISABLED: 0}
            for status, count in await cur.fetchall():
                counts[str(status)] = int(count)
            return counts


    async def bind_session(self, session_id: str, key_id: str, now: datetime) -> str:
        stamp = to_rfc3339(now)
        async with self._write():
            # INSERT OR IGNORE: the first binding wins and is never replaced.
            await self.db.execute(
                "INSERT OR IGNORE INTO session_bindings (session_id, key_id, created_at, seen_at) "
                "VALUES (?, ?, ?, ?)", (session_id, key_id, stamp, stamp))
            async with self.db.execute("SELECT key_id FROM session_bindings WHERE session_id = ?",
                                       (session_id,)) as cur:
                row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    async def session_owner(self, session_id: str) -> str | None:
        async with self.db.execute("SELECT key_id FROM session_bindings WHERE session_id = ?",
                                   (session_id,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row is not None else None

    async def touch_sessions(self, seen: Mapping[str, datetime]) -> None:
        if not seen:
            return
        async with self._write():
            await self.db.executemany(
                "UPDATE session_bindings SET seen_at = MAX(seen_at, ?) WHERE session_id = ?",
                [(to_rfc3339(when), session_id) for session_id, when in seen.items()])

    async def prune_sessions(self, older_than: datetime) -> int:
        async with self._lock:
            cur = await self.db.execute("DELETE FROM session_bindings WHERE seen_at < ?",
                                        (to_rfc3339(older_than),))
            return int(cur.rowcount)


    async def get_or_create_secret(self, name: str, make: Callable[[], str]) -> str:
        async with self._write():
            await self.db.execute("INSERT OR IGNORE INTO shared_settings (name, value) VALUES (?, ?)",
                                  (name, make()))
            async with self.db.execute("SELECT value FROM shared_settings WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    async def put_secret(self, name: str, value: str) -> None:
        async with self._lock:
            await self.db.execute("INSERT INTO shared_settings (name, value) VALUES (?, ?) "
                                  "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))

    async def all_keys(self) -> list[KeyRecord]:
        async with self.db.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at, id") as cur:
            return [_key_from_row(row) for row in await cur.fetchall()]

    async def audit_page(self, after_id: int, limit: int) -> list[AuditRecord]:
        async with self.db.execute(
            "SELECT id, time, action, actor, workspace, key_id, key_name, client, details "
            "FROM audit_events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ) as cur:
            rows = await cur.fetchall()
        return [_audit_from_row(r) for r in rows]

    async def import_records(self, keys: Sequence[KeyRecord], audit: Sequence[AuditRecord]) -> tuple[int, int]:
        added_keys = added_events = 0
        async with self._write():
            for record in keys:
                revision = await self._next_revision()
                cur = await self.db.execute(
                    f"INSERT OR IGNORE INTO keys ({_KEY_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _key_params(record, revision))
                added_keys += cur.rowcount
            for event in audit:
                cur = await self.db.execute(
                    "INSERT OR IGNORE INTO audit_events (id, time, action, actor, workspace, key_id, key_name, "
                    "client, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (event.id, *_audit_params(event)))
                added_events += cur.rowcount
        return added_keys, added_events

def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (``BEGIN ... END;``) whole."""
    statements: list[str] = []
    current: list[str] = []
    in_trigger = False
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].strip()
        if not stripped:
            continue
        current.append(stripped)
        upper = stripped.upper()
        if upper.startswith("CREATE TRIGGER"):
            in_trigger = True
        if stripped.endswith(";") and (not in_trigger or upper.endswith("END;")):
            statements.append(" ".join(current))
            current = []
            in_trigger = False
    if current:
        statements.append(" ".join(current))
    return statements
