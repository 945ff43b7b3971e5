"""Durability of key changes (docs/operations.md: "durable writes for keys and audit"): a burst of creates
and disables through the admin API (and through the CLI) is cut by SIGKILL; afterwards the
SQLite file passes ``PRAGMA integrity_check``, every change a client saw confirmed is there with
its audit event, and no half-written key exists.

What this proves is transaction atomicity and "answer only after COMMIT" under a process crash.
A power cut (lost OS buffers) is a different failure that a test cannot produce here; against
it the store relies on ``synchronous=FULL``, which :func:`test_store_runs_in_wal_with_full_sync`
checks is really in force on the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.processes import Deployment, serving
from tests.support.raw import LOOPBACK
from tests.support.upstreams import RecordingUpstream, recording_upstream

pytestmark = pytest.mark.timeout(90)

ADMIN_API = "/admin/api/keys"


def deployment_for(root: Path, upstream: str) -> Deployment:
    # The running sidecar polls the store often: CLI changes reach it within a fraction of a second.
    return Deployment(root, upstream, {"auth": {"store_poll_seconds": 0.1}})


@dataclass
class Confirmed:
    """Changes whose success response reached the client before the crash."""

    created: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> response body
    disabled: set[str] = field(default_factory=set)


def check_database(path: Path, confirmed: Confirmed) -> dict[str, Any]:
    """Integrity, every confirmed change with its audit row, and no half-written key."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        keys = {row[0]: row for row in db.execute(
            "SELECT id, name, roles, status, key_hash, lookup_id, workspace FROM keys")}
        audit: dict[tuple[str, str], int] = {}
        for action, key_id in db.execute("SELECT action, key_id FROM audit_events WHERE key_id IS NOT NULL"):
            audit[(action, key_id)] = audit.get((action, key_id), 0) + 1
    finally:
        db.close()
    for key_id, body in confirmed.created.items():
        assert key_id in keys, f"confirmed create {key_id} lost"
        assert keys[key_id][1] == body["name"]
        assert audit.get(("key.created", key_id)) == 1
    for key_id in confirmed.disabled:
        assert keys[key_id][3] == "disabled", f"confirmed disable of {key_id} lost"
        assert audit.get(("key.disabled", key_id), 0) >= 1
    for key_id, (_, name, roles, status, key_hash, lookup_id, workspace) in keys.items():
        # No half-written key: hash, roles, lookup id and its creation audit row, all or nothing.
        assert key_hash.startswith("$argon2id$"), key_id
        assert json.loads(roles), key_id
        assert len(lookup_id) == 8
        assert name
        assert workspace == "acme"
        assert status in ("enabled", "disabled")
        assert audit.get(("key.created", key_id)) == 1, f"{key_id} has no key.created audit row"
        if status == "disabled":
            assert audit.get(("key.disabled", key_id), 0) >= 1
    # And the other way round: no audit row for a key change that did not happen.
    for (action, key_id), _ in audit.items():
        if action in ("key.created", "key.disabled"):
            assert key_id in keys, f"{action} audit row for missing key {key_id}"
    return {"keys": len(keys), "confirmed_creates": len(confirmed.created),
            "confirmed_disables": len(confirmed.disabled),
            "status": {key_id: row[3] for key_id, row in keys.items()}}


async def admin_burst(deployment: Deployment, admin_key: str, confirmed: Confirmed, *, workers: int,
                      stop: asyncio.Event, reached: asyncio.Event, threshold: int) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"}

    async def worker(number: int, client: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async with client.post(deployment.admin_url + ADMIN_API, headers=headers,
                                       json={"name": f"w{number}-k{n}", "roles": ["viewer"]}) as response:
                    if response.status != 201:
                        return
                    body = await response.json()
                confirmed.created[body["id"]] = body
                if len(confirmed.created) >= threshold:
                    reached.set()
                if n % 2 == 0:
                    async with client.post(f"{deployment.admin_url}{ADMIN_API}/{body['id']}/disable",
                                           headers=headers) as response:
                        if response.status != 200:
                            return
                        assert (await response.json())["status"] == "disabled"
                    confirmed.disabled.add(body["id"])
            except (TimeoutError, aiohttp.ClientError):
                return  # the server was killed under us: whatever was not confirmed does not count

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as client:
        await asyncio.gather(*(worker(n, client) for n in range(workers)))


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream() as up:
        yield up


async def test_admin_api_changes_confirmed_before_sigkill_survive_with_their_audit_rows(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    deployment = deployment_for(tmp_path, upstream.url)
    admin = await deployment.create_key("ops", "org-admin")
    confirmed = Confirmed()
    async with serving(deployment) as server:
        stop, reached = asyncio.Event(), asyncio.Event()
        burst = asyncio.ensure_future(admin_burst(deployment, admin["key"], confirmed, workers=6, stop=stop,
                                                  reached=reached, threshold=40))
        # Kill mid-burst: requests are in flight, some between BEGIN and COMMIT.
        await asyncio.wait_for(reached.wait(), 20)
        await asyncio.sleep(random.uniform(0, 0.02))
        os.kill(server.pid, signal.SIGKILL)
        await server.wait()
        stop.set()
        await asyncio.wait_for(burst, 15)
    assert len(confirmed.created) >= 40
    assert confirmed.disabled
    counts = check_database(deployment.database, confirmed)
    assert counts["keys"] >= len(confirmed.created) + 1  # + the admin key; unconfirmed ones may exist

    # After a restart the sidecar serves exactly that state: the API lists every confirmed change,
    # a confirmed key authenticates through the proxy and a confirmed disable holds.
    async with serving(deployment) as server:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            async with client.get(deployment.admin_url + ADMIN_API,
                                  headers={"Authorization": f"Bearer {admin['key']}"}) as response:
                assert response.status == 200
                listed = {k["id"]: k for k in (await response.json())["keys"]}
            # A disable may have committed with its answer lost to the kill: such a key is
            # disabled, though not confirmed; the API lists what the database holds.
            status = counts["status"]
            for key_id in confirmed.created:
                assert listed[key_id]["status"] == status[key_id]
                if key_id in confirmed.disabled:
                    assert status[key_id] == "disabled"
            enabled = next(b for i, b in confirmed.created.items() if status[i] == "enabled")
            disabled = next(b for i, b in confirmed.created.items() if i in confirmed.disabled)
            async with client.get(deployment.proxy_url + "/mcp",
                                  headers={"Authorization": f"Bearer {enabled['key']}"}) as response:
                assert response.status == 200
            async with client.get(deployment.proxy_url + "/mcp",
                                  headers={"Authorization": f"Bearer {disabled['key']}"}) as response:
                assert response.status == 401
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 15) == 0
    check_database(deployment.database, confirmed)


async def test_cli_changes_confirmed_before_sigkill_survive_and_killed_ones_leave_nothing_half_written(
        tmp_path: Path) -> None:
    deployment = deployment_for(tmp_path, f"http://{LOOPBACK}:9")
    confirmed = Confirmed()
    rng = random.Random(7)

    async def one(name: str, kill_after: float | None) -> None:
        process = await deployment.start_cli("keys", "create", "--name", name, "--role", "viewer", "--json")
        if kill_after is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), kill_after)
            if process.returncode is None:
                process.kill()
        out, err = await asyncio.wait_for(process.communicate(), 30)
        if kill_after is None:
            # Concurrent CLI writers queue on the database lock; none of them fails for it.
            assert process.returncode == 0, err.decode()
        if process.returncode == 0:
            body = json.loads(out)
            confirmed.created[body["id"]] = body

    # Waves of concurrent CLI processes; half are SIGKILLed at a random moment of their run
    # (opening the store, migrating a fresh file, hashing, inside the INSERT transaction ...).
    for wave in range(2):
        await asyncio.gather(*(
            one(f"cli-{wave}-{n}", rng.uniform(0.3, 0.9) if n % 2 else None) for n in range(6)))
    assert len(confirmed.created) >= 6
    check_database(deployment.database, confirmed)
    # And a CLI disable confirmed just before a kill of the next command survives too.
    victim = next(iter(confirmed.created))
    process = await deployment.start_cli("keys", "disable", victim, "--json")
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    confirmed.disabled.add(victim)
    await one("after-disable", 0.5)
    check_database(deployment.database, confirmed)


def test_store_runs_in_wal_with_full_sync(tmp_path: Path) -> None:
    # synchronous is per connection; what we can check from outside is that the file is in WAL
    # mode, and that the store sets FULL on its own connection (read back through the store).
    from sidecar.keys.store.sqlite import SQLiteKeyStore

    async def pragmas() -> tuple[str, int]:
        store = SQLiteKeyStore(tmp_path / "sidecar.db")
        await store.open()
        try:
            async with store.db.execute("PRAGMA journal_mode") as cur:
                mode = await cur.fetchone()
            async with store.db.execute("PRAGMA synchronous") as cur:
                sync = await cur.fetchone()
        finally:
            await store.close()
        assert mode is not None
        assert sync is not None
        return str(mode[0]), int(sync[0])

    mode, sync = asyncio.run(pragmas())
    assert mode == "wal"
    assert sync == 2  # FULL
