"""Operations: metrics move with real traffic and stay bounded; SIGTERM drains gracefully."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.server import start
from sidecar.settings import Settings, settings_from_mapping

ALLOWED_LABELS = {"status_class", "method", "reason", "status", "kind", "version", "le", "state"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(tmp_path: Path, upstream: str, **proxy: Any) -> Settings:
    return settings_from_mapping({
        "workspace": "ops", "data_dir": str(tmp_path), "shutdown_grace_seconds": 10,
        "proxy": {"listen": f"127.0.0.1:{_free_port()}", "upstream": upstream, **proxy},
        "admin": {"listen": f"127.0.0.1:{_free_port()}"},
        "auth": {"last_used_flush_seconds": 60},
        "argon2": {"memory_cost_kib": 1024, "time_cost": 1},
        "roles": {"viewer": {"description": "read", "permissions": ["plans:read"]},
                  "org-admin": {"description": "admin", "permissions": ["org:settings"]}},
    }, {})


def _sse_app(events: int, interval: float) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(events):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(interval)
        await resp.write_eof()
        return resp

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    app = web.Application()
    app.router.add_get("/sse", stream)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _sidecar(settings: Settings) -> AsyncIterator[SidecarApps]:
    apps = create_app(settings)
    running = await start(apps, settings)
    try:
        yield apps
    finally:
        await running.admin.cleanup()
        await running.public.close()


async def test_metric_families_move_with_real_traffic_and_labels_stay_bounded(tmp_path: Path) -> None:
    async with _serve(_sse_app(1, 0)) as upstream:
        settings = _settings(tmp_path, upstream)
        async with _sidecar(settings) as apps:
            _, key = await apps.services.keys.create(name="agent", roles=["viewer"], actor="test", client=None)
            base = f"http://{settings.proxy.listen}"
            async with aiohttp.ClientSession() as http:
                async with http.post(base + "/mcp", data=b"{}") as resp:
                    assert resp.status == 401
                for _ in range(3):
                    async with http.post(base + "/mcp?x=1", data=b"{}",
                                         headers={"Authorization": f"Bearer {key}"}) as resp:
                        assert resp.status == 200
                async with http.post(base + "/mcp", headers={"Authorization": "Bearer " + key[:-1] + "x"}) as resp:
                    assert resp.status == 401
                await apps.services.refresh_key_gauge()
                async with http.get(f"http://{settings.admin.listen}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
    assert key not in text and "tak_" not in text
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("toolio_sidecar_"):
                assert set(sample.labels) <= ALLOWED_LABELS, sample
                for label in sample.labels.values():
                    assert "/" not in label and "127.0.0.1" not in label and "tak_" not in label
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("toolio_sidecar_requests_total", status_class="2xx", method="POST") == 3
    assert value("toolio_sidecar_requests_total", status_class="4xx", method="POST") == 2
    assert value("toolio_sidecar_auth_failures_total", reason="missing") == 1
    assert value("toolio_sidecar_auth_failures_total", reason="invalid") == 1
    assert value("toolio_sidecar_cache_misses_total") == 1
    assert value("toolio_sidecar_cache_hits_total") == 2
    assert value("toolio_sidecar_cache_size") == 1
    assert value("toolio_sidecar_argon2_verify_seconds_count") == 1
    assert value("toolio_sidecar_upstream_response_head_seconds_count") == 3
    assert value("toolio_sidecar_keys", status="enabled") == 1
    assert value("toolio_sidecar_open_streams") == 0
    # Three sequential requests, one kept-alive upstream connection, idle again at scrape time.
    assert value("toolio_sidecar_upstream_connections", state="idle") == 1
    assert value("toolio_sidecar_upstream_connections", state="busy") == 0
    assert ("toolio_sidecar_upstream_pool_waiting", frozenset()) in samples
    assert value("toolio_sidecar_upstream_pool_waiting") == 0
    assert ("toolio_sidecar_audit_write_failures_total", frozenset()) in samples
    assert any(name == "toolio_sidecar_build_info" for name, _ in samples)


async def test_sigterm_during_an_sse_stream_drains_it_and_exits_zero(tmp_path: Path) -> None:
    async with _serve(_sse_app(events=8, interval=0.25)) as upstream:
        settings = _settings(tmp_path, upstream)
        config = tmp_path / "config.toml"
        config.write_text(
            f'workspace = "ops"\ndata_dir = "{tmp_path}"\nshutdown_grace_seconds = 10\n'
            f'[proxy]\nlisten = "{settings.proxy.listen}"\nupstream = "{upstream}"\n'
            f'[admin]\nlisten = "{settings.admin.listen}"\n'
            '[auth]\nlast_used_flush_seconds = 60\n'
            '[argon2]\nmemory_cost_kib = 1024\ntime_cost = 1\n'
            '[roles.viewer]\ndescription = "read"\npermissions = ["plans:read"]\n'
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        create = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "keys", "create", "--config", str(config), "--name", "agent",
            "--role", "viewer", "--json", stdout=asyncio.subprocess.PIPE, env=env)
        out, _ = await create.communicate()
        assert create.returncode == 0
        created = json.loads(out)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            admin = f"http://{settings.admin.listen}"
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 15
                while True:
                    try:
                        async with http.get(admin + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert time.monotonic() < deadline, "sidecar did not become ready"
                    await asyncio.sleep(0.05)
                base = f"http://{settings.proxy.listen}"
                async with http.get(base + "/mcp", headers={"Authorization": "Bearer tak_nope"}) as resp:
                    assert resp.status == 401
                async with http.get(base + "/sse", headers={"Authorization": f"Bearer {created['key']}"}) as stream:
                    assert stream.status == 200
                    first = await stream.content.readline()
                    assert first == b"data: 0\n"
                    proc.send_signal(signal.SIGTERM)
                    # Readiness fails at once so the load balancer stops sending traffic.
                    t0 = time.monotonic()
                    while True:
                        async with http.get(admin + "/readyz") as resp:
                            if resp.status == 503:
                                break
                        assert time.monotonic() - t0 < 0.5, "readyz did not turn 503 at once"
                        await asyncio.sleep(0.02)
                    rest = await asyncio.wait_for(stream.content.read(), timeout=8)
                assert rest.count(b"data: ") == 7, rest  # the stream finished, nothing cut
            code = await asyncio.wait_for(proc.wait(), timeout=15)
            assert code == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    db = sqlite3.connect(tmp_path / "sidecar.db")
    try:
        last_used = db.execute("SELECT last_used_at FROM keys WHERE id = ?", (created["id"],)).fetchone()[0]
        failed = db.execute("SELECT details FROM audit_events WHERE action = 'auth.failed'").fetchall()
    finally:
        db.close()
    assert last_used is not None, "the last-used batch was not flushed on shutdown"
    assert failed and json.loads(failed[0][0])["count"] == 1, "aggregated auth failures were not flushed"
