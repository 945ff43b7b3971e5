"""The chart's PrometheusRule and Grafana dashboard (docs/operations.md, Alerts and dashboard).

* Both render strictly valid (Kubernetes 1.33; the PrometheusRule against the Prometheus
  Operator CRD schema, tests/support/crds.py).
* ``promtool`` (Debian's ``prometheus`` package) loads the rendered rules as Prometheus would
  (``check rules``) and runs each alert against synthetic series: it fires when it should and
  stays quiet when it should not (``test rules``).
* Every alert expression and dashboard query, parsed with a PromQL parser, names only metrics,
  labels and label values that a live sidecar exports (plus Prometheus's own ``up``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import promql_parser
import pytest

from tests.support.crds import validate_strictly
from tests.support.harness import RunningSidecar, bearer, client_session, event_stream
from tests.support.helm import CHART_DIR, FULLNAME, NAMESPACE, find, render, render_files
from tests.support.metrics import Scrape, scrape

MONITORING = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
              "grafanaDashboard": {"enabled": True}}
JOB = f"{FULLNAME}-admin"
TARGET = f'job="{JOB}",namespace="{NAMESPACE}"'
# Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
# Series Prometheus makes itself for each target, not exported by the sidecar.
PROMETHEUS_SERIES = {"up"}
# Dashboard variables, replaced by example values before parsing.
DASHBOARD_VARIABLES = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$job": JOB}
# Matchers whose value must be one the sidecar exports (a regex may match none on purpose).
_EXACT = (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual)


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install -y prometheus (scripts/test installs it)"
    return found


def rule_groups(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = find(render(chart, values or MONITORING), "PrometheusRule")["spec"]["groups"]
    return groups


def alerts(chart: helm.Chart) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups(chart) for rule in group["rules"]}


def dashboard(chart: helm.Chart) -> dict[str, Any]:
    config_map = find(render(chart, MONITORING), "ConfigMap", f"{FULLNAME}-dashboard")
    board: dict[str, Any] = json.loads(config_map["data"]["toolio-sidecar.json"])
    return board


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_monitoring_resources_are_strictly_valid_and_lint_clean(chart: helm.Chart) -> None:
    report = helm.lint(CHART_DIR, MONITORING, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    manifests = render(chart, MONITORING)
    for manifest in manifests:
        validate_strictly(manifest)
    assert {"PrometheusRule", "ServiceMonitor"} <= {m["kind"] for m in manifests}
    assert "PrometheusRule" not in {m["kind"] for m in render(chart, {})}


def test_prometheus_loads_the_rendered_rules(chart: helm.Chart, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(json.dumps({"groups": rule_groups(chart)}))
    checked = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts(chart))} rules found" in checked.stdout


def test_alerts_are_scoped_to_this_releases_scrape_job(chart: helm.Chart) -> None:
    for name, rule in alerts(chart).items():
        selectors = re.findall(r"\{([^}]*)\}", rule["expr"].split(" by ", 1)[-1])
        assert selectors, name
        for selector in selectors:
            if "=" in selector:  # a `by (...)` list has none
                assert selector.startswith(TARGET), (name, selector)


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    every = {"job": JOB, "namespace": NAMESPACE, **labels}
    text = ",".join(f'{k}="{v}"' for k, v in every.items())
    return {"series": f"{name}{{{text}}}", "values": values}


TARGET_ALERT_LABELS = {"job": JOB, "namespace": NAMESPACE}
# alert -> (series that make it fire, series that must not, labels it fires with)
SCENARIOS: dict[str, tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str]]] = {
    "ToolioSidecarDown": (
        [series("up", "0x15", pod="p-1")],
        [series("up", "1x15", pod="p-1")],
        {"severity": "critical", "pod": "p-1"}),
    "ToolioSidecarHigh5xxRatio": (
        [series("toolio_sidecar_requests_total", "0+10x15", status_class="5xx", method="POST"),
         series("toolio_sidecar_requests_total", "0+90x15", status_class="2xx", method="POST")],
        [series("toolio_sidecar_requests_total", "0+1x15", status_class="5xx", method="POST"),
         series("toolio_sidecar_requests_total", "0+99x15", status_class="2xx", method="POST")],
        {"severity": "critical"}),
    "ToolioSidecarUpstreamErrors": (
        [series("toolio_sidecar_upstream_errors_total", "0+10x15", kind="unreachable"),
         series("toolio_sidecar_requests_total", "0+90x15", status_class="2xx", method="POST")],
        # A client's oversized body is the client's fault, not the upstream's.
        [series("toolio_sidecar_upstream_errors_total", "0+50x15", kind="body_too_large"),
         series("toolio_sidecar_requests_total", "0+90x15", status_class="2xx", method="POST")],
        {"severity": "warning"}),
    "ToolioSidecarAuthFailureSpike": (
        [series("toolio_sidecar_auth_failures_total", "0+120x15", reason="invalid")],
        # Clients probing without any key (no Authorization) are not an attack on keys.
        [series("toolio_sidecar_auth_failures_total", "0+600x15", reason="missing"),
         series("toolio_sidecar_auth_failures_total", "0+6x15", reason="invalid")],
        {"severity": "warning"}),
    "ToolioSidecarRateLimited": (
        [series("toolio_sidecar_auth_failures_total", "0+60x15", reason="rate_limited")],
        [series("toolio_sidecar_auth_failures_total", "0+6x15", reason="rate_limited")],
        {"severity": "warning"}),
    "ToolioSidecarKeyChangeFeedStale": (
        [series("toolio_sidecar_key_cache_trusted", "1 1 1 0x12", pod="p-2"),
         series("toolio_sidecar_key_cache_trusted", "1x15", pod="p-1")],
        [series("toolio_sidecar_key_cache_trusted", "1x15", pod="p-1")],
        {"severity": "warning", "pod": "p-2"}),
    "ToolioSidecarStoreUnavailable": (
        [series("toolio_sidecar_store_unavailable_total", "0 0 0 0 0+5x11")],
        [series("toolio_sidecar_store_unavailable_total", "0x15")],
        {"severity": "critical"}),
    "ToolioSidecarAuditWriteFailures": (
        [series("toolio_sidecar_audit_write_failures_total", "0 0 0 0 1x11")],
        [series("toolio_sidecar_audit_write_failures_total", "3x15")],
        {"severity": "warning"}),
    "ToolioSidecarRateLimitBackendDown": (
        [series("toolio_sidecar_limits_backend_errors_total", "0 0 0 0 0+20x11", outcome="allowed")],
        [series("toolio_sidecar_limits_backend_errors_total", "7x15", outcome="allowed")],
        {"severity": "warning"}),
    "ToolioSidecarAuditEventsDropped": (
        [series("toolio_sidecar_audit_events_dropped_total", "0 0 0 0 50x11")],
        [series("toolio_sidecar_audit_events_dropped_total", "0x15")],
        {"severity": "warning"}),
}


def test_every_alert_has_a_firing_and_a_quiet_scenario(chart: helm.Chart) -> None:
    assert sorted(SCENARIOS) == sorted(alerts(chart))


def test_each_alert_fires_when_it_should_and_stays_quiet_otherwise(chart: helm.Chart, tmp_path: Path) -> None:
    # promtool compares annotations too; they are checked by `check rules` above, not here.
    groups = rule_groups(chart)
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(json.dumps({"groups": groups}))
    tests = []
    for alert, (firing, quiet, labels) in SCENARIOS.items():
        expected = [{"exp_labels": {**TARGET_ALERT_LABELS, **labels}}]
        tests.append({"interval": "1m", "input_series": firing,
                      "alert_rule_test": [{"eval_time": "12m", "alertname": alert, "exp_alerts": expected}]})
        tests.append({"interval": "1m", "input_series": quiet,
                      "alert_rule_test": [{"eval_time": "12m", "alertname": alert, "exp_alerts": []}]})
    unit = tmp_path / "alerts_test.yaml"
    unit.write_text(json.dumps({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool(), "test", "rules", str(unit)], capture_output=True, text=True, check=False,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_thresholds_and_alert_labels_come_from_values(chart: helm.Chart) -> None:
    values = {**MONITORING, "prometheusRule": {
        "enabled": True, "serverErrorRatio": 0.2, "authFailuresPerSecond": 7, "for": "15m",
        "alertLabels": {"team": "platform"}, "labels": {"release": "kube-prometheus-stack"},
        "additionalRules": [{"record": "toolio:requests:rate5m",
                             "expr": "sum(rate(toolio_sidecar_requests_total[5m]))"}]}}
    rule = find(render(chart, values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    by_name = {r.get("alert") or r.get("record"): r for r in rule["spec"]["groups"][0]["rules"]}
    assert by_name["ToolioSidecarHigh5xxRatio"]["expr"].endswith("> 0.2")
    assert by_name["ToolioSidecarHigh5xxRatio"]["for"] == "15m"
    assert by_name["ToolioSidecarAuthFailureSpike"]["expr"].endswith("> 7")
    assert all(r["labels"]["team"] == "platform" for r in by_name.values() if "alert" in r)
    assert by_name["toolio:requests:rate5m"]["expr"] == "sum(rate(toolio_sidecar_requests_total[5m]))"


def test_the_dashboard_is_a_configmap_for_grafanas_sidecar(chart: helm.Chart) -> None:
    values = {**MONITORING, "grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                                 "annotations": {"grafana_folder": "Toolio"}}}
    config_map = find(render(chart, values), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Toolio"}
    board = dashboard(chart)
    assert board["uid"] == "toolio-sidecar"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace", "job"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert len(list(dashboard_queries(board))) >= 20
    assert "dashboard" in render_files(chart, values)["toolio-sidecar/templates/NOTES.txt"].lower()


def selectors(node: Any) -> Iterator[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from selectors(child)
    for child in getattr(node, "args", None) or ():
        yield from selectors(child)


@pytest.fixture
async def exported(sidecar: RunningSidecar) -> Scrape:
    """A live sidecar's /metrics after traffic of every kind the expressions look at."""
    _, key = await sidecar.create_key()
    async with client_session() as http:
        for headers in ({}, bearer(key), bearer(key[:-1] + "x")):
            async with http.post(sidecar.proxy_url + "/mcp", data=b"{}", headers=headers) as resp:
                await resp.read()
    async with event_stream(sidecar.proxy_url + "/sse?events=1&interval=0.01", key) as stream:
        await stream.ended()
    return await scrape(sidecar.admin_url)


def unknown_names(expr: str, metrics: Scrape) -> list[str]:
    """What ``expr`` names that ``metrics`` does not export: a series, a label, a label value."""
    problems = []
    for selector in selectors(promql_parser.parse(expr)):
        name = selector.name
        if name in PROMETHEUS_SERIES:
            continue
        if name not in metrics.sample_labels:
            problems.append(f"series {name}")
            continue
        exported_labels = {label for labels in metrics.sample_labels[name] for label in labels}
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS:
                continue
            if matcher.name not in exported_labels:
                problems.append(f"{name}: label {matcher.name}")
            elif matcher.op in _EXACT and matcher.value not in metrics.label_values(name, matcher.name):
                problems.append(f"{name}: {matcher.name}={matcher.value!r}")
    return problems


async def test_alerts_name_only_what_the_sidecar_exports(chart: helm.Chart, exported: Scrape) -> None:
    for name, rule in alerts(chart).items():
        assert unknown_names(rule["expr"], exported) == [], name


async def test_dashboard_queries_name_only_what_the_sidecar_exports(chart: helm.Chart, exported: Scrape) -> None:
    for title, expr in dashboard_queries(dashboard(chart)):
        for variable, example in DASHBOARD_VARIABLES.items():
            expr = expr.replace(variable, example)
        assert unknown_names(expr, exported) == [], title


def test_the_name_check_catches_a_misspelt_metric_label_or_value() -> None:
    metrics = Scrape.parse('# TYPE toolio_sidecar_x counter\ntoolio_sidecar_x_total{reason="invalid"} 1\n')
    assert unknown_names('rate(toolio_sidecar_x_total{reason="invalid",job="j"}[5m])', metrics) == []
    assert unknown_names("rate(toolio_sidecar_y_total[5m])", metrics) == ["series toolio_sidecar_y_total"]
    assert unknown_names('toolio_sidecar_x_total{kind="a"}', metrics) == ["toolio_sidecar_x_total: label kind"]
    assert unknown_names('toolio_sidecar_x_total{reason="invalidd"}', metrics) == [
        "toolio_sidecar_x_total: reason='invalidd'"]

