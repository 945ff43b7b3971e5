"""Operations: metrics move with real traffic and stay bounded; SIGTERM drains gracefully."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.config import REPOSITORY, ConfigFactory, deep_merge
from tests.support.harness import bearer, client_session, event_stream, running_sidecar
from tests.support.metrics import Scrape, scrape
from tests.support.polling import eventually
from tests.support.processes import Deployment, serving
from tests.support.upstreams import RecordingUpstream

ALLOWED_LABELS = {"status_class", "method", "reason", "status", "kind", "version", "le", "state", "outcome"}
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
    # Every proxied POST, refused or not, in the end-to-end histogram; each within its +Inf bucket.
    assert value("toolio_sidecar_request_duration_seconds_count", method="POST") == 5
    assert value("toolio_sidecar_request_duration_seconds_bucket", method="POST", le="+Inf") == 5
    assert value("toolio_sidecar_request_duration_seconds_sum", method="POST") > 0
    assert value("process_resident_memory_bytes") > 0
    assert value("python_gc_collections_total", generation="0") >= 0
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
    assert value("toolio_sidecar_audit_events_dropped_total") == 0
    assert "toolio_sidecar_build_info" in metrics.sample_labels


@dataclass(frozen=True)
class DocumentedMetric:
    """One name from the README's metrics table, its type and the label values it lists."""

    name: str
    type: str
    labels: dict[str, list[str]]

    @property
    def family(self) -> str:
        """The family name the text format's parser reports (``_total`` is a counter sample's suffix)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    @property
    def exposition_type(self) -> str:
        # The Prometheus text format has no info type: an info metric is a gauge named *_info.
        return "gauge" if self.type == "info" else self.type


def _label_values(text: str) -> list[str]:
    """``GET, POST, ..., OTHER`` or ``1xx..5xx`` -> the listed values (an ellipsis lists none)."""
    values: list[str] = []
    for item in (v.strip() for v in text.split(",")):
        if not item or item in ("...", "\u2026"):
            continue
        span = re.fullmatch(r"(\d)xx\.\.(\d)xx", item)
        values += [f"{n}xx" for n in range(int(span[1]), int(span[2]) + 1)] if span else [item]
    return values


def documented_metrics(readme: str) -> list[DocumentedMetric]:
    """Every row of the README's metrics table (``### Metrics``): metric | type | labels | meaning."""
    section = readme.split("### Metrics", 1)
    assert len(section) == 2, "README.md has no '### Metrics' section"
    lines = section[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    documented = []
    for names, kind, labels, *_ in rows:
        listed = re.findall(r"`([^`]+)`", names)
        assert listed, names
        labelled = {m[1]: _label_values(m[2] or m[3] or "") for m in re.finditer(
            r"`(\w+)`(?:\s*:\s*([^`]*)|\s*\(([^)]*)\))?", labels)}
        for name in listed:
            # "`toolio_sidecar_cache_hits_total` / `_cache_misses_total`": a suffix of the prefix.
            full = "toolio_sidecar" + name if name.startswith("_") else name
            documented.append(DocumentedMetric(full, kind.strip().lower(), labelled))
    return documented


def undocumented_gaps(metrics: Scrape, documented: list[DocumentedMetric]) -> list[str]:
    """What the table lists that the scrape lacks: a family, its type, a label or a label value."""
    gaps = []
    for metric in documented:
        exported = metrics.families.get(metric.family)
        if exported is None:
            gaps.append(f"{metric.name}: not exported")
            continue
        if exported != metric.exposition_type:
            gaps.append(f"{metric.name}: exported as a {exported}, documented as a {metric.type}")
        for label, values in metric.labels.items():
            present = metrics.label_values(metric.family, label)
            if not present:
                gaps.append(f"{metric.name}: no sample has the label {label!r}")
            gaps += [f"{metric.name}: no sample with {label}={value!r}" for value in values if value not in present]
    return gaps


async def test_every_metric_and_label_value_in_the_readme_table_is_exported(
        config: ConfigFactory, echo: RecordingUpstream) -> None:
    documented = documented_metrics((REPOSITORY / "README.md").read_text())
    assert len(documented) >= 15, documented  # the table was found and read
    async with running_sidecar(config.settings({"proxy": {"upstream": echo.url}})) as sidecar:
        _, key = await sidecar.create_key()
        async with client_session() as http:
            for headers in ({}, bearer(key), bearer(key), bearer(key[:-1] + "x")):
                async with http.post(sidecar.proxy_url + "/mcp", data=b"{}", headers=headers) as resp:
                    await resp.read()
        async with event_stream(sidecar.proxy_url + "/sse?events=2&interval=0.01", key) as stream:
            await stream.ended()
        metrics = await scrape(sidecar.admin_url)
    assert undocumented_gaps(metrics, documented) == []


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


async def test_sigterm_cuts_a_stream_that_outlives_the_grace_period_flushes_last_used_and_exits_zero(
        tmp_path: Path, echo: RecordingUpstream) -> None:
    grace = 2.0  # longer than the pre-stop delay, so a cut right after that delay shows
    pre_stop = min(1.0, grace)  # runtime.server.drain: readiness 503 first, then the listeners close
    deployment = Deployment(tmp_path, echo.url, {"shutdown_grace_seconds": grace,
                                                 # Only the shutdown flush can write last-used here.
                                                 "auth": {"last_used_flush_seconds": 60}})
    created = await deployment.create_key("agent", "viewer")
    async with serving(deployment) as proc:
        async with event_stream(deployment.proxy_url + "/sse-forever", created["key"]) as stream:
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            ended = await stream.ended(within=15)
        code = await asyncio.wait_for(proc.wait(), timeout=15)
    # Cut at the limit: not while the grace period runs, and not long after it.
    assert grace <= ended - signalled < pre_stop + grace + 3.0, ended - signalled
    assert code == 0, deployment.log_path.read_text()
    await asyncio.wait_for(echo.sse_closed.wait(), 5)  # its upstream side went too
    db = sqlite3.connect(deployment.database)
    try:
        [(last_used,)] = db.execute("SELECT last_used_at FROM keys WHERE id = ?", (created["id"],)).fetchall()
    finally:
        db.close()
    assert last_used is not None, "the last-used batch was not flushed on shutdown"
