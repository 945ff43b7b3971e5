"""The PostgreSQL key store: one database shared by every replica, the CLI and the admin API.

Same records, errors and ordering as the SQLite store; what differs is how replicas learn of
each other's changes and how they agree at start-up:

* Every key change bumps the ``revision`` row of ``counters`` inside its own transaction. The row
  lock on that counter orders key writers, so revisions become visible in commit order and
  ``changes_since`` never skips a change that commits late. A trigger on the counter sends
  ``NOTIFY toolio_key_changes, '<revision>'`` in the same transaction, so the notification is
  delivered exactly when the change is visible (https://www.postgresql.org/docs/current/sql-notify.html).
* :class:`KeyChangeFeed` listens on a dedicated connection (a ``LISTEN`` on a pooled connection
  ends when the connection goes back to the pool), reconnects by itself and heartbeats, so the
  caller can tell whether it is current. ``external_change_marker`` returns the revision
  counter, so plain polling also works.
* Migrations run in one transaction under ``pg_advisory_xact_lock``
  (https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS): replicas that
  start together apply them once, one after the other; ``schema_migrations`` records each step.
* Audit rows are append-only in the database: a statement trigger refuses UPDATE and TRUNCATE
  on ``audit_events``, a row trigger the DELETE of a row younger than one day, so retention can
  prune only old rows (docs/operations.md, Audit retention).

Tables are created unqualified, in the first schema of the connection's ``search_path``; a URL
may pick one, e.g. ``?options=-csearch_path%3Dtoolio``.

The URL's password never appears in an error this module raises or logs: connection and query
failures become :class:`~sidecar.keys.store.base.StoreError` naming the URL with the password replaced.
"""

# SQL is built only from this module's constants; every value is a bound parameter.

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from sidecar.keys.listing import KeyPage, KeyQuery, page_from_rows
from sidecar.keys.records import DISABLED, ENABLED, AuditRecord, KeyRecord, ToolUsage, from_rfc3339
from sidecar.keys.store.base import TOOL_ACTIVITY_LIMIT, DuplicateLookupId, DuplicateName, KeyStore, StoreError

CHANGE_CHANNEL = "toolio_key_changes"
# Key of the advisory lock held while migrating: any constant unique to this application.
MIGRATION_LOCK_ID = 0x746F6F6C696F0001

_log = logging.getLogger(__name__)

# Versioned migrations, applied in order, all pending ones in one transaction; schema_migrations
# holds one row per applied step. Never edit a released step: append a new one.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE keys (
        id            TEXT PRIMARY KEY,
        lookup_id     TEXT NOT NULL CONSTRAINT keys_lookup_id_key UNIQUE,
        name          TEXT NOT NULL,
        roles         TEXT[] NOT NULL,
        workspace     TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
        key_hash      TEXT NOT NULL,          -- argon2id PHC string; the key itself is never stored
        created_at    TIMESTAMPTZ(3) NOT NULL,
        created_by    TEXT NOT NULL,
        last_used_at  TIMESTAMPTZ(3),
        disabled_at   TIMESTAMPTZ(3),
        expires_at    TIMESTAMPTZ(3),
        disable_at    TIMESTAMPTZ(3),
        revision      BIGINT NOT NULL,
        expiry_noted  BOOLEAN NOT NULL DEFAULT false,  -- the key.expired audit event is written
        CONSTRAINT keys_workspace_name_key UNIQUE (workspace, name)
    );
    CREATE INDEX keys_revision ON keys (revision);
    CREATE INDEX keys_disable_at ON keys (disable_at) WHERE disable_at IS NOT NULL;
    CREATE INDEX keys_expires_at ON keys (expires_at) WHERE expires_at IS NOT NULL AND NOT expiry_noted;

    CREATE TABLE audit_events (
        id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        "time"    TIMESTAMPTZ(3) NOT NULL,
        action    TEXT NOT NULL,
        actor     TEXT NOT NULL,
        workspace TEXT NOT NULL,
        key_id    TEXT,
        key_name  TEXT,
        client    TEXT,
        details   JSONB NOT NULL
    );
    CREATE INDEX audit_workspace_id ON audit_events (workspace, id);
    CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only';
    END $$;
    CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

    CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO counters (name, value) VALUES ('revision', 0);
    CREATE FUNCTION counters_notify_revision() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANGE_CHANNEL}', NEW.value::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER counters_notify_revision AFTER UPDATE ON counters
        FOR EACH ROW WHEN (NEW.name = 'revision') EXECUTE FUNCTION counters_notify_revision();

    CREATE TABLE session_bindings (
        session_id TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL,
        created_at TIMESTAMPTZ(3) NOT NULL,
        seen_at    TIMESTAMPTZ(3) NOT NULL
    );
    CREATE INDEX session_bindings_seen ON session_bindings (seen_at);

    -- Values every replica must share, e.g. the signing key set; first writer wins.
    CREATE TABLE shared_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    -- Audit retention (docs/operations.md, Audit retention): events older than
    -- audit.retention_days are pruned. The database still refuses every UPDATE and TRUNCATE,
    -- and the DELETE of an event younger than one day (the shortest retention), so only old
    -- rows can go.
    DROP TRIGGER audit_events_append_only ON audit_events;
    CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
    CREATE TRIGGER audit_events_keep_recent BEFORE DELETE ON audit_events
        FOR EACH ROW WHEN (OLD."time" > now() - interval '1 day')
        EXECUTE FUNCTION audit_events_append_only();
    CREATE INDEX audit_time ON audit_events ("time");
    -- GET /admin/api/audit?action=&key_id= and a key's activity (docs/reference/admin-api.md).
    CREATE INDEX audit_workspace_action_id ON audit_events (workspace, action, id);
    CREATE INDEX audit_workspace_key_id ON audit_events (workspace, key_id, id);
    CREATE INDEX audit_tool_calls ON audit_events (workspace, key_id, "time") WHERE action = 'tool.called';
    """,
    """
    -- Key listing pages are read in the order of these indexes (sidecar/keys/listing.py); by name
    -- it is the keys_workspace_name_key index. A never-used key sorts as -infinity.
    CREATE INDEX IF NOT EXISTS keys_workspace_created ON keys (workspace, created_at, id);
    CREATE INDEX IF NOT EXISTS keys_workspace_last_used
        ON keys (workspace, COALESCE(last_used_at, '-infinity'::timestamptz), id);
    """,
    """
    -- A key's own rate limit, replacing its roles' (docs/reference/limits.md): "N/second",
    -- "N/minute", "N/hour" or "unlimited"; NULL (every key before this step): its roles'.
    -- Adding a nullable column without a default rewrites no rows.
    ALTER TABLE keys ADD COLUMN IF NOT EXISTS rate_limit TEXT;
    """,
)

_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")

_KEY_COLUMNS = ("id, lookup_id, name, roles, workspace, status, key_hash, created_at, created_by, "
                "last_used_at, disabled_at, expires_at, disable_at, revision, rate_limit")
_SELECT_KEYS = f"SELECT {_KEY_COLUMNS} FROM keys"
_INSERT_KEY = (f"INSERT INTO keys ({_KEY_COLUMNS}) "
               "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
_INSERT_AUDIT = ('INSERT INTO audit_events ("time", action, actor, workspace, key_id, key_name, client, '
                 "details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)")
_BUMP_REVISION = "UPDATE counters SET value = value + 1 WHERE name = 'revision' RETURNING value"
_REVISION = "SELECT value FROM counters WHERE name = 'revision'"
_DISABLE = ("UPDATE keys SET status = 'disabled', disabled_at = COALESCE("
            "CASE WHEN status = 'disabled' THEN disabled_at END, $1), disable_at = NULL, revision = $2 "
            f"WHERE id = $3 RETURNING {_KEY_COLUMNS}")
_ENABLE = ("UPDATE keys SET status = 'enabled', disabled_at = NULL, disable_at = NULL, revision = $1 "
           f"WHERE id = $2 RETURNING {_KEY_COLUMNS}")
_SET_RATE_LIMIT = f"UPDATE keys SET rate_limit = $1, revision = $2 WHERE id = $3 RETURNING {_KEY_COLUMNS}"

# What a lost or refused connection raises; mapped to StoreError at this module's boundary.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


def _ts(value: datetime) -> datetime:
    """UTC, truncated to milliseconds: the same instant the SQLite store keeps (RFC 3339 text with
    milliseconds). A naive value is local time, as ``datetime.astimezone`` reads it."""
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _opt_ts(value: datetime | None) -> datetime | None:
    return None if value is None else _ts(value)


def _key_from_row(row: asyncpg.Record) -> KeyRecord:
    (key_id, lookup_id, name, roles, workspace, status, key_hash, created_at, created_by,
     last_used_at, disabled_at, expires_at, disable_at, revision, rate_limit) = tuple(row)
    return KeyRecord(
        id=key_id, lookup_id=lookup_id, name=name, roles=tuple(roles), workspace=workspace, status=status,
        key_hash=key_hash, created_at=created_at, created_by=created_by, last_used_at=last_used_at,
        disabled_at=disabled_at, expires_at=expires_at, disable_at=disable_at, revision=int(revision),
        rate_limit=rate_limit,
    )


# The sort columns of each listing order, exactly as the listing indexes (MIGRATIONS) spell them.
_NEVER = "'-infinity'::timestamptz"
_SORT_COLUMNS = {"name": ("name",), "created": ("created_at", "id"),
                 "last_used": (f"COALESCE(last_used_at, {_NEVER})", "id")}


def page_sql(query: KeyQuery) -> tuple[str, list[Any]]:
    """The statement and parameters that read one listing page (exposed for the query-plan test)."""
    columns = _SORT_COLUMNS[query.sort]
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if query.workspace is not None:
        where.append(f"workspace = {arg(query.workspace)}")
    elif query.sort == "name":
        columns = (*columns, "id")  # names repeat across workspaces: the id breaks ties

    if query.status is not None:
        where.append(f"status = {arg(query.status)}")
    if query.role is not None:
        where.append(f"{arg(query.role)} = ANY(roles)")
    if query.search is not None:
        # Names are ASCII (sidecar.keys.manager.NAME_RULE), so lower() folds all their case.
        where.append(f"strpos(lower(name), {arg(query.search.lower())}) > 0")
    if query.after is not None:
        seek = "<" if query.descending else ">"
        if query.sort == "name":
            first = arg(query.after.value)
        else:
            when = from_rfc3339(query.after.value)
            first = f"COALESCE({arg(when)}::timestamptz, {_NEVER})" if query.sort == "last_used" else arg(when)
        if len(columns) == 1:
            where.append(f"{columns[0]} {seek} {first}")
        else:
            where.append(f"({', '.join(columns)}) {seek} ({first}, {arg(query.after.key_id)})")
    order = ", ".join(f"{c} DESC" if query.descending else c for c in columns)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{_SELECT_KEYS}{condition} ORDER BY {order} LIMIT {arg(query.limit + 1)}", args


def _audit_params(event: AuditRecord) -> tuple[Any, ...]:
    return (_ts(event.time), event.action, event.actor, event.workspace, event.key_id, event.key_name,
            event.client, json.dumps(dict(event.details), sort_keys=True))


def _audit_from_row(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(id=int(row[0]), time=row[1], action=row[2], actor=row[3], workspace=row[4],
                       key_id=row[5], key_name=row[6], client=row[7], details=json.loads(row[8]))


def _row_count(status: str) -> int:
    """Rows touched, from a command tag such as ``UPDATE 3`` or ``DELETE 0``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


_SECRET_QUERY_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or the query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            auth, _, hosts = netloc.rpartition("@")
            user, has_password, _ = auth.partition(":")
            netloc = f"{user}:***@{hosts}" if has_password else f"{user}@{hosts}"
        query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY_PARAMS else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable PostgreSQL URL>"


def _url_secrets(url: str) -> list[str]:
    """Every form in which the URL's password could show up in a driver's message."""
    found: list[str] = []
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        if ":" in auth:
            found.append(auth.partition(":")[2])
        found.extend(v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_QUERY_PARAMS)
    forms = {form for secret in found for form in (secret, unquote(secret)) if form}
    return sorted(forms, key=len, reverse=True)  # longest first: a form inside another is replaced last


async def _keep_session(con: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook that sends nothing. Pooled connections carry no session state here (no SET,
    LISTEN or session-level advisory lock), so asyncpg's default reset query on every release
    would be a wasted round trip on every store call; asyncpg still rolls back an open transaction."""


class _NoSuchKey(Exception):
    """Internal: roll back a status change whose key does not exist."""


class PostgresKeyStore(KeyStore):
    """Key store in PostgreSQL through an asyncpg pool.

    ``url`` is a libpq-style URL (``postgresql://user:pass@host:5432/db?sslmode=require``).
    Pooled connections keep no session state; :meth:`listen` uses its own connection.
    """

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 10,
                 connect_timeout: float = 5.0, query_timeout: float | None = 10.0,
                 statement_cache_size: int = 100) -> None:
        self._url = url
        self._redacted = redact_url(url)
        self._secrets = _url_secrets(url)
        self._min_connections = min_connections
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        # 0 behind PgBouncer in transaction mode, which cannot keep prepared statements.
        self._statement_cache_size = statement_cache_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._feeds: set[KeyChangeFeed] = set()

    shared = True

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self._redacted!r})"

    @property
    def description(self) -> str:  # type: ignore[override]  # a property over the base's plain attribute
        return f"PostgreSQL at {self._redacted}"

    # -- connections and errors ------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"PostgreSQL at {self._redacted}: {text}"

    @contextlib.contextmanager
    def _boundary(self, *, connecting: bool = False) -> Iterator[None]:
        """Map driver and network errors to StoreError with a password-free message."""
        errors = (*_DRIVER_ERRORS, ValueError) if connecting else _DRIVER_ERRORS  # ValueError: a bad URL
        try:
            yield
        except StoreError:
            raise
        except errors as exc:
            # from None: the driver's exception (and whatever it quotes) stays out of tracebacks.
            raise StoreError(self._describe(exc)) from None

    async def connect(self) -> asyncpg.Connection[asyncpg.Record]:
        """One connection outside the pool (migrations, LISTEN); the caller closes it."""
        with self._boundary(connecting=True):
            return await asyncpg.connect(self._url, timeout=self._connect_timeout,
                                         statement_cache_size=self._statement_cache_size)

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    def _attempts(self, *, transaction: bool = False) -> Iterator[_Attempt]:
        """One pooled connection (in a transaction, if asked) for ``async with``; a second one
        when the first turns out dead before the work was done (a database restart, or
        ``pg_terminate_backend``, leaves every idle pooled connection dead; the pool only learns
        it on use). Usage: ``for attempt in self._attempts(): async with attempt as con: ...``."""
        first = _Attempt(self, transaction, last=False)
        yield first
        if first.lost:
            yield _Attempt(self, transaction, last=True)

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        await self.migrate()
        with self._boundary(connecting=True):
            self._pool = await asyncpg.create_pool(
                self._url, min_size=self._min_connections, max_size=self._max_connections,
                timeout=self._connect_timeout, command_timeout=self._query_timeout,
                statement_cache_size=self._statement_cache_size, reset=_keep_session,
            )

    async def migrate(self) -> int:
        """Apply pending migrations (safe to run from several processes at once); returns how many
        steps this call applied. Works whether or not the store is open."""
        con = await self.connect()
        try:
            with self._boundary():
                async with con.transaction():
                    # Held until COMMIT: a second replica waits here, then finds nothing to do.
                    await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                    await con.execute(_MIGRATIONS_TABLE)
                    version = int(await con.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
                    if version > len(MIGRATIONS):
                        raise StoreError(f"database schema {version} is newer than this sidecar knows "
                                         f"({len(MIGRATIONS)}); upgrade the sidecar")
                    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                        await con.execute(script)
                        await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
                    return len(MIGRATIONS) - version
        finally:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await con.close(timeout=self._connect_timeout)

    async def close(self) -> None:
        feeds, self._feeds = list(self._feeds), set()
        for feed in feeds:
            await feed.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except (*_DRIVER_ERRORS, TimeoutError):
                pool.terminate()

    async def ping(self) -> None:
        for attempt in self._attempts():
            async with attempt as con:
                await con.fetchval("SELECT 1")

    # -- keys ------------------------------------------------------------------------------------

    async def insert_key(self, record: KeyRecord, audit: Sequence[AuditRecord]) -> KeyRecord:
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                revision = int(await con.fetchval(_BUMP_REVISION))
                try:
                    await con.execute(
                        _INSERT_KEY, record.id, record.lookup_id, record.name, list(record.roles), record.workspace,
                        record.status, record.key_hash, _ts(record.created_at), record.created_by,
                        _opt_ts(record.last_used_at), _opt_ts(record.disabled_at), _opt_ts(record.expires_at),
                        _opt_ts(record.disable_at), revision, record.rate_limit,
                    )
                except asyncpg.UniqueViolationError as exc:
                    # Raised inside the transaction, so it rolls back (revision bump and audit rows too).
                    if exc.constraint_name == "keys_lookup_id_key":
                        raise DuplicateLookupId(record.lookup_id) from None
                    raise DuplicateName(record.name) from None
                if audit:
                    await con.executemany(_INSERT_AUDIT, [_audit_params(e) for e in audit])
        return replace(record, revision=revision)

    async def all_keys(self) -> list[KeyRecord]:
        return await self._fetch_keys(f"{_SELECT_KEYS} ORDER BY created_at, id")

    async def audit_page(self, after_id: int, limit: int) -> list[AuditRecord]:
        for attempt in self._attempts():
            async with attempt as con:
                rows = await con.fetch('SELECT id, "time", action, actor, workspace, key_id, key_name, client, details '
                                       "FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit)
        return [_audit_from_row(r) for r in rows]

    async def import_records(self, keys: Sequence[KeyRecord], audit: Sequence[AuditRecord]) -> tuple[int, int]:
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                added_keys = added_events = 0
                for record in keys:
                    revision = int(await con.fetchval(_BUMP_REVISION))
                    status = await con.execute(
                        _INSERT_KEY + " ON CONFLICT (id) DO NOTHING", record.id, record.lookup_id, record.name,
                        list(record.roles), record.workspace, record.status, record.key_hash, _ts(record.created_at),
                        record.created_by, _opt_ts(record.last_used_at), _opt_ts(record.disabled_at),
                        _opt_ts(record.expires_at), _opt_ts(record.disable_at), revision, record.rate_limit)
                    added_keys += _row_count(status)
                for event in audit:
                    # The source's ids are kept, so a second copy finds them and adds nothing.
                    status = await con.execute(
                        'INSERT INTO audit_events (id, "time", action, actor, workspace, key_id, key_name, client, '
                        "details) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb) "
                        "ON CONFLICT (id) DO NOTHING", event.id, *_audit_params(event))
                    added_events += _row_count(status)
                # New events after the copy must get ids above the copied ones.
                await con.execute("SELECT setval(pg_get_serial_sequence('audit_events', 'id'), "
                                  "GREATEST((SELECT COALESCE(MAX(id), 0) FROM audit_events), 1))")
        return added_keys, added_events

    async def _fetch_key(self, sql: str, *args: Any) -> KeyRecord | None:
        for attempt in self._attempts():
            async with attempt as con:
                row = await con.fetchrow(sql, *args)
        return _key_from_row(row) if row is not None else None

    async def _fetch_keys(self, sql: str, *args: Any) -> list[KeyRecord]:
        for attempt in self._attempts():
            async with attempt as con:
                rows = await con.fetch(sql, *args)
        return [_key_from_row(row) for row in rows]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._fetch_key(f"{_SELECT_KEYS} WHERE id = $1", key_id)

    async def get_by_lookup_id(self, lookup_id: str) -> KeyRecord | None:
        return await self._fetch_key(f"{_SELECT_KEYS} WHERE lookup_id = $1", lookup_id)

    async def get_key_by_name(self, workspace: str, name: str) -> KeyRecord | None:
        return await self._fetch_key(f"{_SELECT_KEYS} WHERE workspace = $1 AND name = $2", workspace, name)

    async def page_keys(self, query: KeyQuery) -> KeyPage:
        if query.matches_nothing:
            return KeyPage([], None)
        sql, args = page_sql(query)
        return page_from_rows(await self._fetch_keys(sql, *args), query)

    async def list_keys(self, workspace: str) -> list[KeyRecord]:
        return await self._fetch_keys(f"{_SELECT_KEYS} WHERE workspace = $1 ORDER BY created_at, id", workspace)

    async def set_status(self, key_id: str, status: str, now: datetime,
                         audit: AuditRecord) -> KeyRecord | None:
        def statement(revision: int) -> tuple[str, tuple[Any, ...]]:
            if status == DISABLED:
                return _DISABLE, (_ts(now), revision, key_id)
            return _ENABLE, (revision, key_id)

        return await self._change_key(statement, audit)

    async def set_rate_limit(self, key_id: str, rate_limit: str | None,
                             audit: AuditRecord) -> KeyRecord | None:
        return await self._change_key(lambda revision: (_SET_RATE_LIMIT, (rate_limit, revision, key_id)), audit)

    async def _change_key(self, statement: Callable[[int], tuple[str, tuple[Any, ...]]],
                          audit: AuditRecord) -> KeyRecord | None:
        """One change to a key in one transaction: a new store revision (NOTIFYing the change
        feed), the UPDATE ... RETURNING ``statement(revision)`` gives, and its audit event. None
        when there is no such key (nothing is written)."""
        try:
            for attempt in self._attempts(transaction=True):
                async with attempt as con:
                    revision = int(await con.fetchval(_BUMP_REVISION))
                    sql, args = statement(revision)
                    row = await con.fetchrow(sql, *args)
                    if row is None:
                        raise _NoSuchKey
                    await con.execute(_INSERT_AUDIT, *_audit_params(audit))
        except _NoSuchKey:
            return None
        assert row is not None
        return _key_from_row(row)

    async def schedule_disable(self, key_id: str, when: datetime | None) -> None:
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                revision = int(await con.fetchval(_BUMP_REVISION))
                await con.execute("UPDATE keys SET disable_at = $1, revision = $2 WHERE id = $3",
                                  _opt_ts(when), revision, key_id)

    async def due_scheduled_disables(self, now: datetime) -> list[KeyRecord]:
        return await self._fetch_keys(
            f"{_SELECT_KEYS} WHERE disable_at IS NOT NULL AND disable_at <= $1 AND status = 'enabled' "
            "ORDER BY disable_at, id", _ts(now))

    async def due_expiries(self, now: datetime) -> list[KeyRecord]:
        """Keys whose ``expires_at`` has passed and whose expiry has no audit event yet."""
        return await self._fetch_keys(
            f"{_SELECT_KEYS} WHERE expires_at IS NOT NULL AND NOT expiry_noted AND expires_at <= $1 "
            "ORDER BY expires_at, id", _ts(now))

    async def note_expired(self, key_id: str, audit: AuditRecord) -> bool:
        """Write the expiry's audit event unless another process already did; True if written."""
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                status = await con.execute(
                    "UPDATE keys SET expiry_noted = true WHERE id = $1 AND NOT expiry_noted", key_id)
                noted = _row_count(status) > 0
                if noted:
                    await con.execute(_INSERT_AUDIT, *_audit_params(audit))
        return noted

    async def update_hash(self, key_id: str, key_hash: str) -> None:
        for attempt in self._attempts():
            async with attempt as con:
                await con.execute("UPDATE keys SET key_hash = $1 WHERE id = $2", key_hash, key_id)

    async def touch_last_used(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        # Sorted: replicas flushing overlapping batches lock rows in the same order (no deadlock).
        # GREATEST ignores NULL and keeps the newest time when several replicas share the store.
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                await con.executemany(
                    "UPDATE keys SET last_used_at = GREATEST(last_used_at, $1) WHERE id = $2",
                    [(_ts(when), key_id) for key_id, when in sorted(last_used.items())])

    async def count_by_status(self, workspace: str | None) -> dict[str, int]:
        for attempt in self._attempts():
            async with attempt as con:
                rows = await con.fetch("SELECT status, COUNT(*) FROM keys WHERE $1::text IS NULL OR workspace = $1 "
                                       "GROUP BY status", workspace)
        counts = {ENABLED: 0, DISABLED: 0}
        for status, count in rows:
            counts[str(status)] = int(count)
        return counts

    # -- audit -----------------------------------------------------------------------------------

    async def append_audit(self, events: Iterable[AuditRecord]) -> None:
        rows = [_audit_params(e) for e in events]
        if not rows:
            return
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                await con.executemany(_INSERT_AUDIT, rows)

    async def list_audit(self, workspace: str, limit: int, before: int | None, *,
                         action: str | None = None, key_id: str | None = None) -> list[AuditRecord]:
        sql = ('SELECT id, "time", action, actor, workspace, key_id, key_name, client, details '
               "FROM audit_events WHERE workspace = $1")
        args: list[Any] = [workspace]
        for condition, value in (("action = ", action), ("key_id = ", key_id), ("id < ", before)):
            if value is not None:
                args.append(value)
                sql += f" AND {condition}${len(args)}"
        args.append(limit)
        sql += f" ORDER BY id DESC LIMIT ${len(args)}"
        for attempt in self._attempts():
            async with attempt as con:
                rows = await con.fetch(sql, *args)
        return [_audit_from_row(r) for r in rows]

    async def tool_activity(self, workspace: str, key_id: str, since: datetime) -> list[ToolUsage]:
        # The literal action matches the partial index audit_tool_calls; COLLATE "C" orders
        # ties by code point, as SQLite does.
        for attempt in self._attempts():
            async with attempt as con:
                rows = await con.fetch(
                    "SELECT details->>'tool' COLLATE \"C\" AS tool, "
                    "COUNT(*) FILTER (WHERE details->>'outcome' = 'allowed'), "
                    "COUNT(*) FILTER (WHERE details->>'outcome' = 'denied') "
                    "FROM audit_events WHERE workspace = $1 AND key_id = $2 AND action = 'tool.called' "
                    "AND \"time\" >= $3 AND details->>'tool' IS NOT NULL "
                    "GROUP BY 1 ORDER BY COUNT(*) DESC, 1 LIMIT $4",
                    workspace, key_id, _ts(since), TOOL_ACTIVITY_LIMIT)
        return [ToolUsage(str(tool), int(allowed), int(denied)) for tool, allowed, denied in rows]

    async def prune_audit(self, older_than: datetime, batch: int) -> int:
        # LEAST(...): never ask for a row the audit_events_keep_recent trigger keeps, which would
        # refuse the whole batch. SKIP LOCKED: replicas pruning at once take different rows
        # instead of waiting for each other.
        for attempt in self._attempts():
            async with attempt as con:
                status = await con.execute(
                    "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events "
                    "WHERE \"time\" < LEAST($1, now() - interval '1 day') ORDER BY \"time\" LIMIT $2 "
                    "FOR UPDATE SKIP LOCKED)", _ts(older_than), batch)
        return _row_count(status)

    # -- change feed -----------------------------------------------------------------------------

    async def changes_since(self, revision: int) -> tuple[int, list[KeyRecord]]:
        for attempt in self._attempts():
            async with attempt as con:
                newest = int(await con.fetchval(_REVISION))
                if newest <= revision:
                    return newest, []
                # Rows newer than ``newest`` may show up too (committed between the two reads); they
                # are delivered again on the next call, which is harmless.
                rows = await con.fetch(f"{_SELECT_KEYS} WHERE revision > $1 ORDER BY revision", revision)
        return newest, [_key_from_row(r) for r in rows]

    async def external_change_marker(self) -> int:
        """The revision counter. Unlike SQLite's marker it also moves for this process's own
        commits; a caller that then asks ``changes_since`` just finds what it already knows."""
        for attempt in self._attempts():
            async with attempt as con:
                return int(await con.fetchval(_REVISION))
        raise StoreError("unreachable: the last attempt raises or returns")

    async def listen(self, callback: Callable[[int], None], *, heartbeat_seconds: float = 1.0,
                     max_retry_seconds: float = 2.0) -> KeyChangeFeed:
        """Start a :class:`KeyChangeFeed` calling ``callback(revision)`` after key changes; it
        runs until :meth:`KeyChangeFeed.close` or :meth:`close`. Raises StoreError if the first
        connection fails; later losses are retried by the feed itself."""
        feed = KeyChangeFeed(self, callback, heartbeat_seconds=heartbeat_seconds,
                             max_retry_seconds=max_retry_seconds)
        await feed.start()
        self._feeds.add(feed)
        feed.closed_callback = self._feeds.discard
        return feed

    # -- MCP session bindings --------------------------------------------------------------------

    async def bind_session(self, session_id: str, key_id: str, now: datetime) -> str:
        """Bind ``session_id`` to ``key_id`` unless it is bound already; an existing binding is
        never moved. Returns the owner: the existing one, or ``key_id``."""
        stamp = _ts(now)
        for _ in range(3):
            for attempt in self._attempts():
                async with attempt as con:
                    # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id to commit;
                    # the SELECT (a new snapshot under READ COMMITTED) then sees the winner.
                    owner = await con.fetchval(
                        "INSERT INTO session_bindings (session_id, key_id, created_at, seen_at) "
                        "VALUES ($1, $2, $3, $3) ON CONFLICT (session_id) DO NOTHING RETURNING key_id",
                        session_id, key_id, stamp)
                    if owner is None:
                        owner = await con.fetchval("SELECT key_id FROM session_bindings WHERE session_id = $1",
                                                   session_id)
            if owner is not None:
                return str(owner)
            # Pruned between the two statements: try again.
        raise StoreError("session binding could not be read back")

    async def session_owner(self, session_id: str) -> str | None:
        for attempt in self._attempts():
            async with attempt as con:
                owner = await con.fetchval("SELECT key_id FROM session_bindings WHERE session_id = $1", session_id)
        return None if owner is None else str(owner)

    async def touch_sessions(self, seen: Mapping[str, datetime]) -> None:
        """Record when bound sessions were last used (batched by the caller)."""
        if not seen:
            return
        for attempt in self._attempts(transaction=True):
            async with attempt as con:
                await con.executemany(
                    "UPDATE session_bindings SET seen_at = GREATEST(seen_at, $1) WHERE session_id = $2",
                    [(_ts(when), session_id) for session_id, when in sorted(seen.items())])

    async def prune_sessions(self, older_than: datetime) -> int:
        """Forget bindings not used since ``older_than``; returns how many."""
        for attempt in self._attempts():
            async with attempt as con:
                status = await con.execute("DELETE FROM session_bindings WHERE seen_at < $1", _ts(older_than))
        return _row_count(status)

    # -- shared settings -------------------------------------------------------------------------

    async def put_secret(self, name: str, value: str) -> None:
        for attempt in self._attempts():
            async with attempt as con:
                await con.execute("INSERT INTO shared_settings (name, value) VALUES ($1, $2) "
                                  "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", name, value)

    async def get_or_create_secret(self, name: str, make: Callable[[], str]) -> str:
        """The value stored under ``name``; if there is none, ``make()``'s value is stored. When
        several replicas race, the first commit wins and every caller gets that value."""
        select = "SELECT value FROM shared_settings WHERE name = $1"
        for attempt in self._attempts():
            async with attempt as con:
                value = await con.fetchval(select, name)
        if value is not None:
            return str(value)
        candidate = make()
        for attempt in self._attempts():
            async with attempt as con:
                value = await con.fetchval(
                    "INSERT INTO shared_settings (name, value) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO NOTHING RETURNING value", name, candidate)
                if value is None:
                    value = await con.fetchval(select, name)
        if value is None:
            raise StoreError(f"shared setting {name!r} could not be read back")
        return str(value)


# A pooled connection the server already closed: nothing of the work reached the database.
# (InternalClientError: asyncpg's protocol state after the server's FATAL message arrived on an
# idle connection, e.g. from pg_terminate_backend.)
_CONNECTION_LOST = (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError,
                    asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError)


class _Attempt:
    """One try at a unit of work on a pooled connection (see ``PostgresKeyStore._attempts``)."""

    def __init__(self, store: PostgresKeyStore, transaction: bool, *, last: bool) -> None:
        self._store = store
        self._transaction = transaction
        self._last = last
        self._acquired: Any = None
        self._tx: Any = None
        self.lost = False

    async def __aenter__(self) -> PoolConnectionProxy[asyncpg.Record]:
        with self._store._boundary():
            self._acquired = self._store.pool.acquire()
            con: PoolConnectionProxy[asyncpg.Record] = await self._acquired.__aenter__()
            if self._transaction:
                try:
                    self._tx = con.transaction()
                    await self._tx.start()
                except BaseException as exc:
                    await self._acquired.__aexit__(type(exc), exc, exc.__traceback__)
                    if isinstance(exc, _CONNECTION_LOST) and not self._last:
                        return await self._retry_enter()
                    raise
            return con

    async def _retry_enter(self) -> PoolConnectionProxy[asyncpg.Record]:
        # BEGIN itself found the connection dead: take a fresh one right here.
        await self._store.pool.expire_connections()
        self._last = True
        return await self.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        acquired, self._acquired = self._acquired, None
        with self._store._boundary():
            try:
                if self._tx is not None:
                    if exc is None:
                        # A loss here is not retried: the COMMIT may have landed.
                        await self._tx.commit()
                    else:
                        with contextlib.suppress(*_DRIVER_ERRORS):
                            await self._tx.rollback()
            finally:
                await acquired.__aexit__(kind, exc, tb)
        if exc is not None and isinstance(exc, _CONNECTION_LOST) and not self._last:
            # Idle connections after a restart are all dead: make the pool open fresh ones.
            await self._store.pool.expire_connections()
            self.lost = True
            return True
        if exc is not None and isinstance(exc, _DRIVER_ERRORS) and not isinstance(exc, StoreError):
            raise StoreError(self._store._describe(exc)) from None
        return False


class KeyChangeFeed:
    """``LISTEN toolio_key_changes`` on a dedicated connection, kept alive by this class.

    ``callback(revision)`` runs (synchronously, on the event loop) when a key change commits,
    and also after every (re)connection with the current revision, since notifications sent
    while disconnected are lost: the caller then asks ``changes_since`` for what it missed. A
    heartbeat reads the revision every ``heartbeat_seconds``; it notices a silently dead
    connection and covers a notification that never arrived. Reconnection is this class's job
    (exponential back-off up to ``max_retry_seconds``); the caller only reads :meth:`is_current`
    to decide whether its cache may be trusted.
    """

    def __init__(self, store: PostgresKeyStore, callback: Callable[[int], None], *,
                 heartbeat_seconds: float = 1.0, max_retry_seconds: float = 2.0) -> None:
        self._store = store
        self._callback = callback
        self._heartbeat = heartbeat_seconds
        self._max_retry = max_retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._connected = False
        self._confirmed_at: float | None = None
        self._delivered = -1
        self._backend_pid: int | None = None
        self.reconnects = 0
        self.closed_callback: Callable[[KeyChangeFeed], None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def delivered_revision(self) -> int:
        return self._delivered

    @property
    def backend_pid(self) -> int | None:
        """The server process of the LISTEN connection (``pg_stat_activity.pid``), when connected."""
        return self._backend_pid if self._connected else None

    @property
    def confirmed_at(self) -> float | None:
        """``time.monotonic()`` when the feed last knew it had delivered every change."""
        return self._confirmed_at

    def is_current(self, max_staleness_seconds: float) -> bool:
        """Connected, and confirmed current within the last ``max_staleness_seconds``."""
        return (self._connected and self._confirmed_at is not None
                and time.monotonic() - self._confirmed_at <= max_staleness_seconds)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="postgres-key-changes")
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected = False
        if self.closed_callback is not None:
            self.closed_callback(self)

    def _confirm(self) -> None:
        self._confirmed_at = time.monotonic()

    def _deliver(self, revision: int, *, always: bool = False) -> None:
        if revision <= self._delivered and not always:
            return
        self._delivered = max(self._delivered, revision)
        try:
            self._callback(revision)
        except Exception as exc:  # the feed outlives a faulty callback
            _log.error("key change callback failed: %r", exc)

    def _on_notification(self, _con: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            revision = int(str(payload))
        except ValueError:
            return
        self._confirm()
        self._deliver(revision)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._session()
            except StoreError as exc:
                problem = str(exc)
            except Exception as exc:  # lost connection, timeout, or anything else: retry
                problem = self._store._describe(exc)
            else:  # pragma: no cover - _session only returns by raising
                problem = "connection ended"
            self._connected = False
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(StoreError(problem))
                return
            _log.warning("key change feed lost, reconnecting in %.2fs: %s", delay, problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry)
            self.reconnects += 1

    async def _session(self) -> None:
        con = await self._store.connect()
        lost = asyncio.Event()
        con.add_termination_listener(lambda _c: lost.set())
        try:
            self._backend_pid = con.get_server_pid()
            await con.add_listener(CHANGE_CHANNEL, self._on_notification)
            # Read only after LISTEN is in force: nothing committed in between is missed.
            revision = int(await con.fetchval(_REVISION, timeout=self._heartbeat * 5))
            self._connected = True
            self._confirm()
            self._deliver(revision, always=True)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._heartbeat)
                if lost.is_set() or con.is_closed():
                    raise StoreError(f"PostgreSQL at {self._store._redacted}: LISTEN connection closed")
                revision = int(await con.fetchval(_REVISION, timeout=self._heartbeat * 5))
                self._confirm()
                self._deliver(revision)
        finally:
            self._connected = False
            con.terminate()
