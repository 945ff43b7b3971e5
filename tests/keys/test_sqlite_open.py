"""Several processes opening one new SQLite file at the same moment: two pods' init containers
running ``keys import``, or ``serve`` starting beside a CLI command. Each must open it (the
switch to WAL, then the migrations under one write lock), none may fail with "database is
locked"."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

OPEN = """
import asyncio, sys
from pathlib import Path
from sidecar.keys.store.sqlite import SQLiteKeyStore

async def main() -> None:
    store = SQLiteKeyStore(Path(sys.argv[1]))
    await store.open()
    await store.close()

asyncio.run(main())
"""


async def test_processes_opening_a_new_file_together_all_succeed(tmp_path: Path) -> None:
    # A race: each round is a new file and four processes at once (one round in ten failed
    # with two processes before the switch to WAL was retried).
    for round_ in range(12):
        path = tmp_path / f"round-{round_}" / "sidecar.db"
        path.parent.mkdir()
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", OPEN, str(path), stderr=asyncio.subprocess.PIPE) for _ in range(4)]
        results = await asyncio.gather(*(p.communicate() for p in processes))
        failures = [err.decode() for (_, err), p in zip(results, processes, strict=True) if p.returncode]
        assert failures == [], failures
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("PRAGMA user_version").fetchone()[0] > 0
