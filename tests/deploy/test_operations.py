"""Operations: metrics move with real traffic and stay bounded; SIGTERM drains gracefully."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

from tests.support.config import ConfigFactory, deep_merge
from tests.support.harness import bearer, client_session, running_sidecar
from tests.support.metrics import scrape
from tests.support.polling import eventually
from tests.support.processes import Deployment, serving
from tests.support.upstreams import RecordingUpstream

ALLOWED_LABELS = {"status_class", "method", "reason", "status", "kind", "version", "le", "state"}
# What the tests below change from the test base: a long grace period, last-used flushed only
# at shutdown (once a minute otherwise), the workspace "ops".
OPERATIONS = {"workspace": "ops", "shutdown_grace_seconds": 10, "auth": {"last_used_flush_seconds": 60}}


async def test_metric_families_move_with_real_traffic_and_labels_stay_bounded(
        config: ConfigFactory, echo: RecordingUpstream) -> None:
    async with running_sidecar(config.settings(deep_merge(OPERATIONS, {"proxy": {"upstream": echo.url}}))) as sidecar:
        _, key = await sidecar.create_key()
        base = sidecar.proxy_url
        async with client_session() as http:
            async with http.post(base + "/mcp", data=b"{}") as resp:
                assert resp.status == 401
            for _ in range(3):
                async with http.post(base + "/mcp?x=1", data=b"{}", headers=bearer(key)) as resp:
                    assert resp.status == 200
            async with http.post(base + "/mcp", headers=bearer(key[:-1] + "x")) as resp:
                assert resp.status == 401
        await sidecar.services.refresh_key_gauge()
        metrics = await scrape(sidecar.admin_url)
    text = metrics.text
    assert key not in text and "tak_" not in text
    for (name, labels), _ in metrics.samples.items():
        if name.startswith("toolio_sidecar_"):
            assert {label for label, _ in labels} <= ALLOWED_LABELS, (name, labels)
            for _, label in labels:
                assert "/" not in label and "127.0.0.1" not in label and "tak_" not in label
    value = metrics.value  # fails when a sample is missing: absent is not zero

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
    assert value("toolio_sidecar_upstream_pool_waiting") == 0
    assert value("toolio_sidecar_audit_write_failures_total") == 0
    assert "toolio_sidecar_build_info" in metrics.sample_labels


async def test_sigterm_during_an_sse_stream_drains_it_and_exits_zero(
        tmp_path: Path, echo: RecordingUpstream) -> None:
    deployment = Deployment(tmp_path, echo.url, OPERATIONS)
    created = await deployment.create_key("agent", "viewer")
    async with serving(deployment) as proc, client_session() as http:
        admin = deployment.admin_url
        base = deployment.proxy_url
        async with http.get(base + "/mcp", headers=bearer("tak_nope")) as resp:
            assert resp.status == 401
        async with http.get(base + "/sse?events=8&interval=0.25", headers=bearer(created["key"])) as stream:
            assert stream.status == 200
            first = await stream.content.readuntil(b"\n\n")
            assert first == b"id: 0\ndata: event 0\n\n"
            proc.send_signal(signal.SIGTERM)
            # Readiness fails at once so the load balancer stops sending traffic: before the
            # drain's pre-stop delay (1 s) ends and the listeners close.
            t0 = time.monotonic()

            async def not_ready() -> bool:
                async with http.get(admin + "/readyz") as resp:
                    return resp.status == 503

            await eventually(not_ready, what="readyz 503")
            assert time.monotonic() - t0 < 1.0, "readyz did not turn 503 before the listeners closed"
            rest = await asyncio.wait_for(stream.content.read(), timeout=8)
        assert rest.count(b"data: ") == 7, rest  # the stream finished, nothing cut
        code = await asyncio.wait_for(proc.wait(), timeout=15)
        assert code == 0
    db = sqlite3.connect(deployment.database)
    try:
        last_used = db.execute("SELECT last_used_at FROM keys WHERE id = ?", (created["id"],)).fetchone()[0]
        failed = db.execute("SELECT details FROM audit_events WHERE action = 'auth.failed'").fetchall()
    finally:
        db.close()
    assert last_used is not None, "the last-used batch was not flushed on shutdown"
    assert failed and json.loads(failed[0][0])["count"] == 1, "aggregated auth failures were not flushed"

