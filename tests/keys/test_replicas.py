"""Several replicas on one PostgreSQL store: real ``toolio-sidecar serve`` processes sharing a
real database (docs/operations.md, "Several replicas").

* a key made through one replica works on the other at once;
* a disable through A is refused on B within a second, and B's open SSE stream is cut;
* B cut off from the database (its connections killed with ``pg_terminate_backend`` and new
  ones refused) while A disables a key: B refuses the key within ``max_staleness_seconds`` + 1 s
  (503, it cannot confirm), then 401 once the database is back, with no restart;
* a database restart: every replica recovers by itself;
* a 2025-era MCP session opened through A works through B for its key and is 403 for another;
* both replicas publish the same JWKS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from tests.support.mcp import mcp_client, mcp_url
from tests.support.polling import eventually
from tests.support.postgres import server_bindir
from tests.support.processes import Deployment, serving
from tests.support.upstreams import RecordingUpstream, run_echo_upstream

pytest_plugins = ["tests.support.postgres"]

STALENESS = 1.0


class TcpGate:
    """A loopback TCP relay to the database that a test can close: the real network path of a
    replica, cut (every relayed connection reset, new ones refused) and restored."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, upstream: str, urls: list[str],
                   **overrides: Any) -> AsyncIterator[list[Deployment]]:
    for i in range(len(urls)):
        (tmp_path / f"replica-{i}").mkdir()
    deployments = [Deployment(tmp_path / f"replica-{i}", upstream, {
        "store": {"url": url, "max_staleness_seconds": STALENESS}, **overrides})
        for i, url in enumerate(urls)]
    async with contextlib.AsyncExitStack() as stack:
        for deployment in deployments:
            await stack.enter_async_context(serving(deployment))
        yield deployments


async def _status(http: aiohttp.ClientSession, deployment: Deployment, key: str, path: str = "/mcp") -> int:
    async with http.post(deployment.proxy_url + path, data=b"{}",
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status


async def _admin(http: aiohttp.ClientSession, deployment: Deployment, admin_key: str, method: str, path: str,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with http.request(method, deployment.admin_url + "/admin/api" + path, json=body,
                            headers={"Authorization": f"Bearer {admin_key}"}) as resp:
        assert resp.status in (200, 201), await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def _within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    started = time.monotonic()
    await eventually(check, within=seconds, interval=0.01)
    return time.monotonic() - started


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with run_echo_upstream() as recording:
        yield recording


async def test_a_key_made_on_one_replica_works_on_the_other_and_a_disable_reaches_it_within_a_second(
        tmp_path: Path, pg_url: str, upstream: RecordingUpstream) -> None:
    async with replicas(tmp_path, upstream.url, [pg_url, pg_url]) as (a, b), aiohttp.ClientSession() as http:
        admin = (await a.create_key("ops", "org-admin"))["key"]
        created = await _admin(http, a, admin, "POST", "/keys", {"name": "agent", "roles": ["viewer"]})
        key = created["key"]
        assert await _status(http, b, key) == 200
        # An SSE stream open on B with the key...
        async with http.get(b.proxy_url + "/sse-forever", headers={"Authorization": f"Bearer {key}"}) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            await _admin(http, a, admin, "POST", f"/keys/{created['id']}/disable")
            disabled = time.monotonic()

            async def stream_ended() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 0.2)
                    return False
                return True

            await eventually(stream_ended, within=3, interval=0)
            assert time.monotonic() - disabled < 1.0
        # ...and B refuses the key from then on.
        assert await _status(http, b, key) == 401
        # Enabling on B works on A.
        await _admin(http, b, admin, "POST", f"/keys/{created['id']}/enable")
        assert await _within(1.0, lambda: _is(http, a, key, 200)) < 1.0


async def _is(http: aiohttp.ClientSession, deployment: Deployment, key: str, status: int) -> bool:
    return await _status(http, deployment, key) == status


async def test_a_replica_cut_off_from_the_database_never_lets_a_disabled_key_through(
        tmp_path: Path, pg_url: str, upstream: RecordingUpstream) -> None:
    parts = urlsplit(pg_url)
    gate = TcpGate(parts.hostname or "127.0.0.1", parts.port or 5432)
    await gate.open()
    async with replicas(tmp_path, upstream.url, [pg_url, _via(pg_url, gate.port)]) as (a, b), \
            aiohttp.ClientSession() as http:
        admin = (await a.create_key("ops", "org-admin"))["key"]
        created = await _admin(http, a, admin, "POST", "/keys", {"name": "agent", "roles": ["viewer"]})
        key = created["key"]
        assert await _status(http, b, key) == 200  # cached on B
        # B's connections are killed in the database and it cannot reconnect.
        await gate.cut()
        con = await asyncpg.connect(pg_url)
        try:
            # Every sidecar backend in the database: A reconnects at once, B cannot.
            await con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await con.close()
        await _admin(http, a, admin, "POST", f"/keys/{created['id']}/disable")
        refused_after = await _within(STALENESS + 1.0, lambda: _refused(http, b, key))
        assert refused_after <= STALENESS + 1.0
        # Still refused while the database stays unreachable for B: 503, never a guess.
        assert await _status(http, b, key) == 503
        # The way back: B reconnects by itself and knows the key is disabled.
        await gate.open()
        await _within(10.0, lambda: _is(http, b, key, 401))
        await eventually(lambda: _trusted(http, b), within=5, interval=0.1)


async def _trusted(http: aiohttp.ClientSession, deployment: Deployment) -> bool:
    async with http.get(deployment.admin_url + "/metrics") as resp:
        return "\ntoolio_sidecar_key_cache_trusted 1.0\n" in await resp.text()


async def _refused(http: aiohttp.ClientSession, deployment: Deployment, key: str) -> bool:
    return await _status(http, deployment, key) in (401, 503)


async def test_every_replica_recovers_from_a_database_restart(
        tmp_path: Path, pg_throwaway_cluster: Callable[[], contextlib.AbstractContextManager[str]],
        upstream: RecordingUpstream) -> None:
    with pg_throwaway_cluster() as server:
        async with replicas(tmp_path, upstream.url, [server, server]) as (a, b), \
                aiohttp.ClientSession() as http:
            admin = (await a.create_key("ops", "org-admin"))["key"]
            created = await _admin(http, a, admin, "POST", "/keys", {"name": "agent", "roles": ["viewer"]})
            key = created["key"]
            assert await _status(http, b, key) == 200
            await _restart(server)
            # After the restart, changes made through A reach B again, without restarting either.
            await eventually(lambda: _admin_ok(http, a, admin, f"/keys/{created['id']}/disable"), within=15,
                             interval=0.2)
            await _within(5.0, lambda: _is(http, b, key, 401))
            await _admin(http, a, admin, "POST", f"/keys/{created['id']}/enable")
            await _within(5.0, lambda: _is(http, b, key, 200))


async def _restart(server: str) -> None:
    """Restart the cluster behind ``server`` (fast shutdown: every connection is cut)."""
    con = await asyncpg.connect(server)
    try:
        data = Path(await con.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'"))
    finally:
        await con.close()
    await asyncio.to_thread(_pg_ctl_restart, data)


def _pg_ctl_restart(data: Path) -> None:
    owner = data.stat()
    # The new postmaster writes to the cluster's log file, not to pipes of ours it would keep open.
    subprocess.run([str(server_bindir() / "pg_ctl"), "-D", str(data), "-l", str(data.parent / "server.log"),
                    "-m", "fast", "-w", "-t", "60", "restart"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120, cwd=data.parent,
                   user=owner.st_uid if os.geteuid() == 0 else None,
                   group=owner.st_gid if os.geteuid() == 0 else None)


async def _admin_ok(http: aiohttp.ClientSession, deployment: Deployment, admin_key: str, path: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.post(deployment.admin_url + "/admin/api" + path,
                             headers={"Authorization": f"Bearer {admin_key}"}) as resp:
            return resp.status == 200
    return False


async def test_a_legacy_mcp_session_opened_through_one_replica_holds_on_the_other(
        tmp_path: Path, pg_url: str, mcp_upstream: str) -> None:
    async with replicas(tmp_path, mcp_upstream, [pg_url, pg_url]) as (a, b), aiohttp.ClientSession() as http:
        owner = (await a.create_key("owner", "viewer"))["key"]
        other = (await a.create_key("other", "viewer"))["key"]
        async with mcp_client(mcp_url(a.proxy_url), token=owner, mode="legacy") as client:
            await client.call_tool("add", {"a": 1, "b": 2})
            con = await asyncpg.connect(pg_url)
            try:
                [session] = [r["session_id"] for r in await con.fetch("SELECT session_id FROM session_bindings")]
            finally:
                await con.close()
            body = b'{"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}'
            headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25",
                       "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
            async with http.post(mcp_url(b.proxy_url), data=body,
                                 headers={**headers, "Authorization": f"Bearer {other}"}) as resp:
                assert resp.status == 403
            async with http.post(mcp_url(b.proxy_url), data=body,
                                 headers={**headers, "Authorization": f"Bearer {owner}"}) as resp:
                assert resp.status == 200
                assert b'"add"' in await resp.read()  # the session's own tool list, through B
            # The session still works through A too.
            assert (await client.call_tool("add", {"a": 2, "b": 2})).structured_content == {"result": 4}


async def test_every_replica_publishes_the_same_jwks_from_the_shared_store(
        tmp_path: Path, pg_url: str, upstream: RecordingUpstream) -> None:
    async with replicas(tmp_path, upstream.url, [pg_url, pg_url]) as (a, b), aiohttp.ClientSession() as http:
        documents = []
        for deployment in (a, b):
            async with http.get(deployment.proxy_url + "/.well-known/jwks.json") as resp:
                documents.append(await resp.json())
        assert documents[0] == documents[1]
        assert len(documents[0]["keys"]) == 1


async def test_the_store_outlives_its_pooled_connections_being_killed(pg_url: str) -> None:
    from sidecar.keys.records import AuditRecord, utcnow
    from sidecar.keys.store.postgres import PostgresKeyStore

    store = PostgresKeyStore(pg_url, min_connections=3, max_connections=3)
    await store.open()
    try:
        await asyncio.gather(*(store.ping() for _ in range(3)))  # three live pooled connections
        con = await asyncpg.connect(pg_url)
        try:
            killed = await con.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await con.close()
        assert killed >= 3
        # Reads and writes right after: each finds its connection dead and takes a fresh one.
        assert await store.get_key("key_missing") is None
        await store.append_audit([AuditRecord(time=utcnow(), action="test.event", actor="test", workspace="acme")])
        assert [e.action for e in await store.list_audit("acme", 10, None)] == ["test.event"]
    finally:
        await store.close()
