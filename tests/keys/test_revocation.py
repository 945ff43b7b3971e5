"""Disable means now, enable means at once: the edges between authentication and forwarding, and
key changes reaching a running sidecar from elsewhere (the CLI in another process, a rotation's
scheduled disable) even when the store is briefly locked by someone else."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar.keys.records import AuditRecord, from_rfc3339, to_rfc3339
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, bearer, client_session, event_stream
from tests.support.metrics import sample, scrape
from tests.support.polling import eventually, never
from tests.support.processes import run_cli, start_cli
from tests.support.upstreams import RecordingUpstream

# The same tests on both stores (SQLite, PostgreSQL): docs/operations.md, Several replicas.
pytestmark = pytest.mark.usefixtures("both_stores")


async def _status(sidecar: RunningSidecar, key: str) -> int:
    async with client_session() as http, http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


async def _status_is(sidecar: RunningSidecar, key: str, want: int) -> bool:
    return await _status(sidecar, key) == want


async def _audit(sidecar: RunningSidecar, action: str, key_id: str | None = None) -> list[AuditRecord]:
    events = await sidecar.services.store.list_audit(sidecar.settings.workspace, 100, None)
    return [e for e in events if e.action == action and (key_id is None or e.key_id == key_id)]


@contextmanager
def locked(database: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the SQLite file's write lock (BEGIN EXCLUSIVE) for the block."""
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield locker
        locker.execute("ROLLBACK")
    finally:
        locker.close()


async def test_a_key_disabled_while_its_request_body_arrives_is_not_forwarded(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key()
    async with client_session() as http, http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
        assert resp.status == 200  # verified and cached
    echo.requests.clear()
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    try:
        writer.write(f"POST /sse-forever HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        await writer.drain()
        # The head is authenticated (a cache hit: the key was verified above); the handler waits
        # for the body.
        await eventually(lambda: sample(sidecar.services.registry, "toolio_sidecar_cache_hits_total") >= 1)
        await sidecar.disable(record.id)
        writer.write(body[5:])
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            rest = await reader.read()  # the connection ends: refused, or cut at once
    finally:
        writer.close()
    # Refused (401) or dropped when the cut cancelled the body read; either way never forwarded.
    assert b" 200 " not in status_line, status_line + rest
    assert echo.requests == []


async def test_re_enabled_key_works_at_once_even_after_many_refusals_while_disabled(
        sidecar: RunningSidecar) -> None:
    record, key = await sidecar.create_key()
    await sidecar.disable(record.id)
    limit = sidecar.settings.auth.failures_per_minute_per_lookup_id
    async with client_session() as http:
        for _ in range(limit + 3):
            async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
                assert resp.status == 401
        await sidecar.enable(record.id)
        async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
            assert resp.status == 200


async def test_failed_attempts_reach_the_audit_log_within_seconds_aggregated(
        sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    wrong = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]  # bad checksum, same lookup id
    async with client_session() as http:
        for _ in range(3):
            async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(wrong)) as resp:
                assert resp.status == 401
    store = sidecar.services.store

    async def failures() -> list[dict[str, object]]:  # the housekeeping tick writes them within ~5 s
        return [e.as_json() for e in await store.list_audit(sidecar.settings.workspace, 50, None)
                if e.action == "auth.failed"]

    events = await eventually(failures)
    assert len(events) == 1, events
    details = events[0]["details"]
    assert isinstance(details, dict)
    assert details["count"] == 3
    assert key not in json.dumps(events) and wrong not in json.dumps(events)


# -- key changes made elsewhere ------------------------------------------------------------------


async def test_cli_disable_in_another_process_cuts_the_keys_open_stream_within_one_second(
        config: ConfigFactory, sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    # The running sidecar learns of the CLI's write by polling the store (auth.store_poll_seconds).
    path = config.write({"proxy": {"upstream": echo.url}})
    record, key = await sidecar.create_key("streamer")
    _, bystander = await sidecar.create_key("bystander")
    script = Path(sys.executable).with_name("toolio-sidecar")
    async with (event_stream(sidecar.proxy_url + "/sse-forever", key) as stream,
                event_stream(sidecar.proxy_url + "/sse-forever", bystander) as other):
        result = await run_cli("keys", "disable", record.id, "--config", str(path), "--json", program=str(script))
        assert result.returncode == 0, result.stderr
        # From the commit (the CLI's own disabled_at), not from the CLI's start-up.
        disabled_at = from_rfc3339(result.json()["disabled_at"])
        assert disabled_at is not None
        await stream.ended()
        assert other.open  # only that key's streams are cut
    assert stream.ended_wall is not None
    assert stream.ended_wall - disabled_at < timedelta(seconds=1), stream.ended_wall - disabled_at
    await asyncio.wait_for(echo.sse_closed.wait(), 5)  # the upstream side of the stream is closed too
    assert await _status(sidecar, key) == 401
    assert await _status(sidecar, bystander) == 200


async def test_a_rotation_disables_the_old_key_at_disable_old_at_through_housekeeping(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    old, old_key = await sidecar.create_key("v1")
    _, admin_key = await sidecar.create_key("ops", roles=["org-admin"])
    when = datetime.now(UTC) + timedelta(seconds=2)
    async with event_stream(sidecar.proxy_url + "/sse-forever", old_key) as stream:
        async with (client_session() as http,
                    http.post(f"{sidecar.admin_url}/admin/api/keys/{old.id}/rotate", headers=bearer(admin_key),
                              json={"name": "v2", "disable_old_at": to_rfc3339(when)}) as resp):
            assert resp.status == 201, await resp.text()
            rotated = await resp.json()
        new_key = rotated["key"]
        # Until then both work: the overlap a rotation is for.
        assert await _status(sidecar, new_key) == 200
        assert stream.open
        await stream.ended(within=15)
    # Housekeeping (every second) disables it once its time has come, and not before.
    assert stream.ended_wall is not None
    assert stream.ended_wall >= when - timedelta(milliseconds=50), (stream.ended_wall, when)
    assert stream.ended_wall - when < timedelta(seconds=5), stream.ended_wall - when
    assert await _status(sidecar, old_key) == 401
    assert await _status(sidecar, new_key) == 200
    [disabled] = await _audit(sidecar, "key.disabled", old.id)
    assert disabled.actor == "scheduler"
    assert disabled.key_name == "v1"


@pytest.mark.sqlite_only  # reads or locks the SQLite file itself
async def test_a_cli_disable_waiting_on_a_locked_store_is_applied_once_the_lock_is_released(
        config: ConfigFactory, sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    path = config.write({"proxy": {"upstream": echo.url}})
    record, key = await sidecar.create_key()
    assert await _status(sidecar, key) == 200  # verified and cached
    with locked(config.database):
        cli = await start_cli("keys", "disable", record.id, "--config", str(path), "--json")
        # Nothing can be written meanwhile: the CLI waits for the lock, and the sidecar, polling
        # the store all along, has no change to apply.
        await never(lambda: cli.returncode is not None, during=1.5)
        assert await _status(sidecar, key) == 200
    out, err = await asyncio.wait_for(cli.communicate(), 30)
    assert cli.returncode == 0, err.decode()
    assert json.loads(out)["status"] == "disabled"
    # Not lost: the next poll sees the change and the cached key is refused.
    await eventually(lambda: _status_is(sidecar, key, 401), what="the disabled key refused")
    [disabled] = await _audit(sidecar, "key.disabled", record.id)
    assert disabled.actor == "cli"


@pytest.mark.sqlite_only  # reads or locks the SQLite file itself
async def test_audit_rows_a_locked_store_refuses_are_counted_in_audit_write_failures(
        config: ConfigFactory, sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    wrong = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]  # bad checksum, same lookup id
    for _ in range(3):
        assert await _status(sidecar, wrong) == 401  # aggregated, written by housekeeping in ~5 s
    assert sample(sidecar.services.registry, "toolio_sidecar_audit_write_failures_total") == 0

    async def refused() -> float:
        return (await scrape(sidecar.admin_url)).value("toolio_sidecar_audit_write_failures_total")

    with locked(config.database):
        # The write waits out the store's busy timeout (5 s), then the rows are counted as lost.
        assert await eventually(refused, within=30, interval=0.5) >= 1
    assert await _audit(sidecar, "auth.failed") == []
    # The sidecar itself carries on.
    assert await _status(sidecar, key) == 200
