"""PostgreSQL driver comparison for the shared key store: asyncpg against psycopg 3 (async, pooled).

Two operations, shaped like the store's own SQL:

* ``select``: a point select of one key row by lookup id, the path a request takes when the key
  is not in the cache (cold verify), measured one at a time (latency) and with ``--concurrency``
  tasks sharing the pool (throughput);
* ``insert``: one admin write, a transaction that bumps the revision counter, inserts a key row
  and its audit row, with the counter's NOTIFY trigger firing at commit.

asyncpg's pool sends a reset query (``RESET ALL; UNLISTEN *; ...``) on every release by default;
the ``asyncpg, no reset`` row passes a reset hook that sends nothing, as the store does.
psycopg runs with ``autocommit=True`` so a select is not wrapped in BEGIN/COMMIT (what its pool
does otherwise), and with server-side prepared statements after its default threshold; the
``psycopg+pipeline`` row sends the insert transaction in one pipeline (libpq pipeline mode,
https://www.postgresql.org/docs/current/libpq-pipeline-mode.html) to show what batching buys.

Every run creates its own database on the server and drops it afterwards; rounds alternate the
driver order. This is a measurement, not a test: nothing here asserts.

Run from the repository root:
    .venv/bin/python bench/store_drivers.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
"""

# SQL is built only from this module's constants; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
from psycopg_pool import AsyncConnectionPool

SCHEMA = """
CREATE TABLE keys (
    id TEXT PRIMARY KEY, lookup_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, roles TEXT[] NOT NULL,
    workspace TEXT NOT NULL, status TEXT NOT NULL, key_hash TEXT NOT NULL,
    created_at TIMESTAMPTZ(3) NOT NULL, created_by TEXT NOT NULL, last_used_at TIMESTAMPTZ(3),
    disabled_at TIMESTAMPTZ(3), expires_at TIMESTAMPTZ(3), disable_at TIMESTAMPTZ(3),
    revision BIGINT NOT NULL, UNIQUE (workspace, name));
CREATE TABLE audit_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "time" TIMESTAMPTZ(3) NOT NULL,
    action TEXT NOT NULL, actor TEXT NOT NULL, workspace TEXT NOT NULL, key_id TEXT, key_name TEXT,
    client TEXT, details JSONB NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters VALUES ('revision', 0);
CREATE FUNCTION notify_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('toolio_bench', NEW.value::text); RETURN NULL; END $$;
CREATE TRIGGER counters_notify AFTER UPDATE ON counters FOR EACH ROW EXECUTE FUNCTION notify_revision();
"""

COLUMNS = ("id, lookup_id, name, roles, workspace, status, key_hash, created_at, created_by, "
           "last_used_at, disabled_at, expires_at, disable_at, revision")
SELECT_PG = f"SELECT {COLUMNS} FROM keys WHERE lookup_id = $1"
SELECT_PS = f"SELECT {COLUMNS} FROM keys WHERE lookup_id = %s"
BUMP = "UPDATE counters SET value = value + 1 WHERE name = 'revision' RETURNING value"
INSERT_KEY_PG = (f"INSERT INTO keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, 'enabled', $6, $7, 'bench', "
                 "NULL, NULL, NULL, NULL, $8)")
INSERT_KEY_PS = INSERT_KEY_PG.replace("$8", "%s")
for _n in range(7, 0, -1):
    INSERT_KEY_PS = INSERT_KEY_PS.replace(f"${_n}", "%s")
# Pipeline form: the revision is read back inside the same transaction instead of from RETURNING.
INSERT_KEY_PIPE = INSERT_KEY_PS.replace(
    "NULL, %s)", "NULL, (SELECT value FROM counters WHERE name = 'revision'))")
INSERT_AUDIT_PG = ('INSERT INTO audit_events ("time", action, actor, workspace, key_id, key_name, client, '
                   "details) VALUES ($1, 'key.created', 'bench', $2, $3, $4, NULL, $5::jsonb)")
INSERT_AUDIT_PS = ('INSERT INTO audit_events ("time", action, actor, workspace, key_id, key_name, client, '
                   "details) VALUES (%s, 'key.created', 'bench', %s, %s, %s, NULL, %s::jsonb)")

SEED_KEYS = 10_000


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def lookup(n: int) -> str:
    return f"L{n:07d}"


def key_args(n: int) -> tuple[Any, ...]:
    return (f"key_{n:016d}_{secrets.token_hex(4)}", "N" + secrets.token_hex(6), f"bench-{n}-{secrets.token_hex(4)}",
            ["viewer"], "acme", "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 60)


class Samples:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.round_p50: list[float] = []
        self.throughput: list[float] = []

    def add_round(self, lat: list[float]) -> None:
        self.latencies.extend(lat)
        self.round_p50.append(statistics.median(lat))


async def timed(op: Callable[[int], Awaitable[None]], count: int, start: int = 0) -> list[float]:
    out: list[float] = []
    for i in range(count):
        t = time.perf_counter()
        await op(start + i)
        out.append((time.perf_counter() - t) * 1e6)
    return out


async def concurrent_rate(op: Callable[[int], Awaitable[None]], count: int, tasks: int) -> float:
    async def worker(w: int) -> None:
        for i in range(w, count, tasks):
            await op(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    return count / (time.perf_counter() - t)


class Driver:
    name = ""

    async def open(self, url: str, size: int) -> None: ...
    async def close(self) -> None: ...
    async def select(self, i: int) -> None: ...
    async def insert(self, i: int) -> None: ...


async def keep_session(con: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook that sends nothing: the store's pooled connections carry no session state
    (no SET, LISTEN or session advisory locks), so asyncpg's default reset query on every release
    is a wasted round trip. asyncpg still rolls back a transaction left open."""


class Asyncpg(Driver):
    name = "asyncpg"
    reset: Callable[[asyncpg.Connection[asyncpg.Record]], Awaitable[None]] | None = None

    async def open(self, url: str, size: int) -> None:
        self.pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
            url, min_size=size, max_size=size, reset=self.reset)

    async def close(self) -> None:
        await self.pool.close()

    async def select(self, i: int) -> None:
        row = await self.pool.fetchrow(SELECT_PG, lookup(i % SEED_KEYS))
        assert row is not None

    async def insert(self, i: int) -> None:
        kid, lid, name, roles, ws, key_hash = key_args(i)
        now = datetime.now(UTC)
        async with self.pool.acquire() as con, con.transaction():
            revision = await con.fetchval(BUMP)
            await con.execute(INSERT_KEY_PG, kid, lid, name, roles, ws, key_hash, now, revision)
            await con.execute(INSERT_AUDIT_PG, now, ws, kid, name, '{"roles": ["viewer"]}')


class AsyncpgNoReset(Asyncpg):
    name = "asyncpg, no reset"
    reset = staticmethod(keep_session)


class Psycopg(Driver):
    name = "psycopg"
    pipeline = False

    async def open(self, url: str, size: int) -> None:
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            url, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False)
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def select(self, i: int) -> None:
        async with self.pool.connection() as con:
            cur = await con.execute(SELECT_PS, (lookup(i % SEED_KEYS),))
            row = await cur.fetchone()
        assert row is not None

    async def insert(self, i: int) -> None:
        kid, lid, name, roles, ws, key_hash = key_args(i)
        now = datetime.now(UTC)
        async with self.pool.connection() as con:
            if self.pipeline:
                async with con.pipeline(), con.transaction():
                    await con.execute(BUMP)
                    await con.execute(INSERT_KEY_PIPE, (kid, lid, name, roles, ws, key_hash, now))
                    await con.execute(INSERT_AUDIT_PS, (now, ws, kid, name, '{"roles": ["viewer"]}'))
                return
            async with con.transaction():
                cur = await con.execute(BUMP)
                row = await cur.fetchone()
                assert row is not None
                await con.execute(INSERT_KEY_PS, (kid, lid, name, roles, ws, key_hash, now, row[0]))
                await con.execute(INSERT_AUDIT_PS, (now, ws, kid, name, '{"roles": ["viewer"]}'))


class PsycopgPipeline(Psycopg):
    name = "psycopg+pipeline"
    pipeline = True


async def run(args: argparse.Namespace) -> None:
    database = f"toolio_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = with_database(args.url, database)
    try:
        setup = await asyncpg.connect(url)
        try:
            await setup.execute(SCHEMA)
            now = datetime.now(UTC)
            await setup.copy_records_to_table(
                "keys", columns=[c.strip() for c in COLUMNS.split(",")],
                records=[(f"seed_{n:016d}", lookup(n), f"seed-{n}", ["viewer"], "acme", "enabled",
                          "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 60, now, "bench", None, None, None, None, 0)
                         for n in range(SEED_KEYS)])
            await setup.execute("ANALYZE")
        finally:
            await setup.close()
        drivers: list[Driver] = [Asyncpg(), AsyncpgNoReset(), Psycopg(), PsycopgPipeline()]
        select: dict[str, Samples] = {d.name: Samples() for d in drivers}
        insert: dict[str, Samples] = {d.name: Samples() for d in drivers}
        offset = SEED_KEYS
        for rnd in range(args.rounds):
            order = drivers[rnd % len(drivers):] + drivers[:rnd % len(drivers)]
            for driver in order:
                await driver.open(url, args.concurrency)
                try:
                    await timed(driver.select, 300)  # warm-up: connections, prepared statements
                    if not isinstance(driver, PsycopgPipeline):
                        select[driver.name].add_round(await timed(driver.select, args.ops))
                        select[driver.name].throughput.append(
                            await concurrent_rate(driver.select, args.ops * 2, args.concurrency))
                    await timed(driver.insert, 50, offset)
                    offset += 50
                    insert[driver.name].add_round(await timed(driver.insert, args.insert_ops, offset))
                    offset += args.insert_ops
                finally:
                    await driver.close()
                print(f"round {rnd + 1}: {driver.name} done", flush=True)
        print()
        print(f"PostgreSQL {await server_version(args.url)}; {SEED_KEYS} keys; {args.rounds} rounds, "
              f"driver order rotated; latency in microseconds, one operation at a time")
        print(f"asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} (impl {psycopg.pq.__impl__})")
        print()
        print(f"(a) point select by lookup id: {args.ops} per round; throughput with "
              f"{args.concurrency} tasks on a pool of {args.concurrency}")
        print(f"{'driver':18} {'p50':>8} {'mean':>8} {'p99':>8}  {'p50 per round':24} {'ops/s':>8}")
        for name, s in select.items():
            if s.latencies:
                print(f"{name:18} {report(s)} {statistics.median(s.throughput):8.0f}")
        print()
        print(f"(b) insert key + audit row in one transaction (revision bump, NOTIFY trigger): "
              f"{args.insert_ops} per round")
        print(f"{'driver':18} {'p50':>8} {'mean':>8} {'p99':>8}  {'p50 per round':24}")
        for name, s in insert.items():
            print(f"{name:18} {report(s)}")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def report(s: Samples) -> str:
    lat = sorted(s.latencies)
    p99 = lat[int(len(lat) * 0.99)]
    rounds = " ".join(f"{v:.0f}" for v in s.round_p50)
    return f"{statistics.median(lat):8.0f} {statistics.fmean(lat):8.0f} {p99:8.0f}  {rounds:24}"


async def server_version(url: str) -> str:
    con = await asyncpg.connect(url)
    try:
        return str(await con.fetchval("SHOW server_version"))
    finally:
        await con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server URL whose user may CREATE DATABASE")
    parser.add_argument("--ops", type=int, default=4000, help="point selects per driver and round")
    parser.add_argument("--insert-ops", type=int, default=2000, help="insert transactions per driver and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
