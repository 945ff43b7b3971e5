"""Shutdown cancels the background jobs and waits for them. A job cancelled half-way through a
store write must end with ``CancelledError``: if the store's cleanup (a ROLLBACK after the
cancelled COMMIT already ran on aiosqlite's worker thread) raised its own error instead, the
job's loop took it for an ordinary failure, went round again, and ``close()`` waited forever.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.keys.records import utcnow
from sidecar.keys.store.sqlite import SQLiteKeyStore
from sidecar.runtime.services import Services
from tests.support.config import ConfigFactory
from tests.support.records import key_record

pytestmark = pytest.mark.timeout(60)


async def test_a_write_cancelled_anywhere_ends_cancelled_and_leaves_the_store_usable(tmp_path: Path) -> None:
    store = SQLiteKeyStore(tmp_path / "sidecar.db")
    await store.open()
    try:
        record = await store.insert_key(key_record(1), [])
        outcomes: set[str] = set()
        # Cancel after 0, 1, 2, ... loop turns: between BEGIN, the UPDATE and COMMIT, each on
        # aiosqlite's thread, the cancellation lands at every point in the transaction.
        for turns in range(40):
            task = asyncio.create_task(store.touch_last_used({record.id: utcnow() + timedelta(seconds=turns)}))
            for _ in range(turns % 8):
                await asyncio.sleep(0)
            task.cancel()
            (result,) = await asyncio.gather(task, return_exceptions=True)
            assert not isinstance(result, sqlite3.Error | ValueError), result
            outcomes.add("cancelled" if isinstance(result, asyncio.CancelledError) else "done")
        assert "cancelled" in outcomes
        # No transaction was left open: the next write takes the lock and commits.
        later = utcnow() + timedelta(days=1)
        await store.touch_last_used({record.id: later})
        stored = await store.get_key(record.id)
        assert stored is not None and stored.last_used_at is not None
        assert abs((stored.last_used_at - later).total_seconds()) < 1
    finally:
        await store.close()


async def test_a_background_job_stops_when_cancelled_even_if_its_cleanup_fails(config: ConfigFactory) -> None:
    services = Services(config.settings())
    started = asyncio.Event()

    async def job() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None

    task = asyncio.create_task(services._every(0, job))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, "the job's loop went on after it was cancelled"
    assert task.cancelled()


async def test_a_job_that_fails_on_its_own_keeps_running(config: ConfigFactory) -> None:
    services = Services(config.settings())
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1
        raise OSError("the store is away")

    task = asyncio.create_task(services._every(0, job))
    try:
        for _ in range(100):
            await asyncio.sleep(0)
            if runs >= 3:
                break
        assert runs >= 3
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
