"""The store under test in tests/keys: each test runs once on a SQLite file and once on a fresh
PostgreSQL schema.

* ``backend_url``: ``""`` for SQLite, else the URL of a fresh PostgreSQL schema;
* ``db_path``: where the SQLite file lives (unused on PostgreSQL);
* ``store``: that store, opened (schema migrated) and closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.postgres import PostgresKeyStore
from sidecar.keys.store.sqlite import SQLiteKeyStore
from tests.support.postgres import fresh_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, pg_database: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""
        return
    with fresh_schema(pg_database) as url:
        yield url


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sidecar.db"


def new_store(backend_url: str, db_path: Path) -> KeyStore:
    """Another, unopened store on the same database as ``store``."""
    return PostgresKeyStore(backend_url) if backend_url else SQLiteKeyStore(db_path)


@pytest.fixture
async def store(backend_url: str, db_path: Path) -> AsyncIterator[KeyStore]:
    s = new_store(backend_url, db_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
