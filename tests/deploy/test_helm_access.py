"""The chart's public access (Ingress, Gateway API HTTPRoute, session affinity), the bootstrap
admin key from a Secret, and the NetworkPolicy with a ServiceMonitor (docs/operations.md).

Rendered by the real Helm engine (helm-python-sdk) and validated strictly: built-in kinds against
Kubernetes 1.33 (kubernetes-validate), the HTTPRoute against the Gateway API v1 CRD schema of
its channel (tests/support/crds.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from sidecar.__main__ import main
from sidecar.keys.format import generate_key
from sidecar.keys.importer import IMPORT_KEY_ENV
from tests.support.crds import validate_strictly
from tests.support.helm import CHART_DIR, FULLNAME, NAMESPACE, SIGNING_DIR, Manifest, find, kinds, render, render_files

POSTGRES = {"type": "postgres", "postgres": {"existingSecret": "toolio-db"}}
HOST = "mcp.example.com"
TLS = [{"secretName": "mcp-example-tls", "hosts": [HOST]}]
GATEWAY = [{"name": "public", "namespace": "gateway", "sectionName": "https"}]
ADMIN_SECRET = "toolio-admin-key"

CASES: dict[str, dict[str, Any]] = {
    "ingress-tls": {
        "ingress": {"enabled": True, "className": "nginx", "tls": TLS,
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                    "hosts": [{"host": HOST, "paths": [{"path": "/mcp", "pathType": "Prefix"}]}]},
    },
    "ingress-key-affinity": {
        "replicaCount": 3, "store": POSTGRES,
        "ingress": {"enabled": True, "className": "nginx", "tls": TLS},
        "sessionAffinity": {"mode": "key"},
    },
    "ingress-cookie-affinity": {
        "replicaCount": 2, "store": POSTGRES,
        "ingress": {"enabled": True, "tls": TLS},
        "sessionAffinity": {"mode": "cookie", "cookieName": "mcp-route", "timeoutSeconds": 3600},
    },
    "httproute": {
        "httpRoute": {"enabled": True, "parentRefs": GATEWAY, "hostnames": [HOST], "timeouts": {"request": "0s"}},
    },
    "httproute-cookie-affinity": {
        "replicaCount": 3, "store": POSTGRES,
        "httpRoute": {"enabled": True, "parentRefs": GATEWAY, "hostnames": [HOST]},
        "sessionAffinity": {"mode": "cookie"},
    },
    "loadbalancer-client-ip": {
        "replicaCount": 2, "store": POSTGRES,
        "service": {"type": "LoadBalancer"},
        "sessionAffinity": {"mode": "clientIP", "timeoutSeconds": 600},
    },
    "bootstrap": {"bootstrap": {"adminKeySecret": ADMIN_SECRET}},
    "bootstrap-postgres": {
        "replicaCount": 3, "store": POSTGRES,
        "bootstrap": {"adminKeySecret": ADMIN_SECRET, "secretKey": "value", "name": "gitops-admin",
                      "roles": ["org-admin", "viewer"], "resources": {"requests": {"cpu": "50m"}}},
        "config": {"roles": {"org-admin": {"description": "admins", "permissions": ["org:settings"]},
                             "viewer": {"description": "read", "permissions": ["plans:read"]}}},
    },
    "networkpolicy-servicemonitor": {
        "networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True},
    },
}


def channel(case: dict[str, Any]) -> str:
    """Session persistence is in the Gateway API's experimental channel only."""
    return "experimental" if case.get("sessionAffinity", {}).get("mode") == "cookie" else "standard"


def notes(chart: helm.Chart, values: dict[str, Any]) -> str:
    return render_files(chart, values)["toolio-sidecar/templates/NOTES.txt"]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    spec: Manifest = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_new_values_combination_is_strictly_valid_for_kubernetes_1_33(chart: helm.Chart, case: str) -> None:
    report = helm.lint(CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    manifests = render(chart, CASES[case])
    for manifest in manifests:
        validate_strictly(manifest, channel(CASES[case]))


def test_ingress_routes_the_hosts_to_the_public_service_with_tls(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["ingress-tls"])
    ingress = find(manifests, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == TLS
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-buffering": "off"}
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == HOST
    [path] = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/mcp", "Prefix")
    backend = path["backend"]["service"]
    service = find(manifests, "Service", backend["name"])
    assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["proxy"]  # never the admin port
    assert "Ingress" not in kinds(render(chart, {}))


def test_notes_say_tls_must_terminate_in_front_and_warn_about_a_plain_ingress(chart: helm.Chart) -> None:
    for values in ({}, CASES["ingress-tls"], CASES["httproute"]):
        assert "TLS must terminate in front of the public port" in notes(chart, values)
    assert f"https://{HOST}/" in notes(chart, CASES["ingress-tls"])
    assert "WARNING: ingress.tls is empty" not in notes(chart, CASES["ingress-tls"])
    plain = notes(chart, {"ingress": {"enabled": True}})
    assert "WARNING: ingress.tls is empty" in plain
    assert "API key in clear text" in plain
    assert "WARNING: service.type is LoadBalancer" in notes(chart, {"service": {"type": "LoadBalancer"}})


def test_key_affinity_hashes_the_authorization_header_not_the_session_id(chart: helm.Chart) -> None:
    # The initialize that creates a 2025-era session carries no Mcp-Session-Id, so a hash of that
    # header would send the session's later requests to another pod; one key always hashes alike.
    annotations = find(render(chart, CASES["ingress-key-affinity"]), "Ingress")["metadata"]["annotations"]
    assert annotations == {"nginx.ingress.kubernetes.io/upstream-hash-by": "$http_authorization"}


def test_cookie_affinity_sets_ingress_nginx_persistent_cookie_annotations(chart: helm.Chart) -> None:
    values = {**CASES["ingress-cookie-affinity"], "ingress": {
        **CASES["ingress-cookie-affinity"]["ingress"],
        "annotations": {"nginx.ingress.kubernetes.io/session-cookie-name": "chosen-here"}}}
    annotations = find(render(chart, values), "Ingress")["metadata"]["annotations"]
    assert annotations == {
        "nginx.ingress.kubernetes.io/affinity": "cookie",
        "nginx.ingress.kubernetes.io/affinity-mode": "persistent",
        "nginx.ingress.kubernetes.io/session-cookie-name": "chosen-here",  # the operator's own value wins
        "nginx.ingress.kubernetes.io/session-cookie-max-age": "3600",
    }


def test_http_route_attaches_to_the_gateway_and_targets_the_public_service(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["httproute"])
    route = find(manifests, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == GATEWAY
    assert route["spec"]["hostnames"] == [HOST]
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": FULLNAME, "port": 8080}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["timeouts"] == {"request": "0s"}
    assert "sessionPersistence" not in rule
    assert find(manifests, "Service", FULLNAME)["spec"]["ports"][0]["port"] == 8080


def test_cookie_affinity_on_the_http_route_is_gateway_session_persistence(chart: helm.Chart) -> None:
    route = find(render(chart, CASES["httproute-cookie-affinity"]), "HTTPRoute")
    [rule] = route["spec"]["rules"]
    assert rule["sessionPersistence"] == {"type": "Cookie", "sessionName": "toolio-route",
                                          "absoluteTimeout": "10800s", "cookieConfig": {"lifetimeType": "Session"}}
    # An experimental-channel field: a standard-channel Gateway API install refuses it.
    with pytest.raises(AssertionError, match="sessionPersistence"):
        validate_strictly(route, "standard")


def test_client_ip_affinity_is_the_public_services_own(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["loadbalancer-client-ip"])
    public = find(manifests, "Service", FULLNAME)["spec"]
    assert public["sessionAffinity"] == "ClientIP"
    assert public["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 600}}
    assert "sessionAffinity" not in find(manifests, "Service", f"{FULLNAME}-admin")["spec"]
    assert "sessionAffinity" not in find(render(chart, {}), "Service", FULLNAME)["spec"]


@pytest.mark.parametrize(("values", "message"), [
    ({"sessionAffinity": {"mode": "key"}, "httpRoute": {"enabled": True, "parentRefs": GATEWAY}},
     r"mode \"key\" hashes the Authorization header .* needs ingress.enabled"),
    ({"sessionAffinity": {"mode": "cookie"}}, r"mode \"cookie\" needs ingress.enabled .* or httpRoute.enabled"),
    ({"httpRoute": {"enabled": True}}, r"httpRoute.parentRefs is empty"),
    ({"bootstrap": {"adminKeySecret": ADMIN_SECRET, "roles": ["root"]}}, r"bootstrap.roles names \"root\""),
], ids=["key-without-ingress", "cookie-without-route", "route-without-gateway", "bootstrap-unknown-role"])
def test_impossible_access_settings_fail_with_a_clear_message(
        chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


def test_notes_point_at_affinity_for_several_pods(chart: helm.Chart) -> None:
    several = {"replicaCount": 3, "store": POSTGRES}
    assert "need sessionAffinity (key or cookie)" in notes(chart, several)
    assert "Session affinity (key)" in notes(chart, CASES["ingress-key-affinity"])
    standalone = {**CASES["ingress-key-affinity"], "mode": "standalone"}
    assert "MCP server's own\n   Service sessionAffinity: ClientIP" in notes(chart, standalone)


def bootstrap_container(manifests: list[Manifest]) -> Manifest:
    [init] = pod_spec(manifests)["initContainers"]
    container: Manifest = init
    return container


def test_bootstrap_imports_the_key_from_the_secret_in_an_init_container(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["bootstrap"])
    init = bootstrap_container(manifests)
    sidecar = pod_spec(manifests)["containers"][0]
    assert init["name"] == "bootstrap-admin-key"
    assert init["image"] == sidecar["image"]
    assert init["securityContext"] == sidecar["securityContext"]
    assert init["args"] == ["keys", "import", "--config", "/etc/toolio-sidecar/config.toml",
                            "--name", "bootstrap-admin", "--role", "org-admin"]
    [env] = init["env"]
    assert env == {"name": IMPORT_KEY_ENV,
                   "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": "key"}}}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"config": "/etc/toolio-sidecar", "data": "/data", "tmp": "/tmp"}
    assert "initContainers" not in pod_spec(render(chart, {}))


def test_bootstrap_with_postgres_reaches_the_shared_store_with_the_chosen_roles(chart: helm.Chart) -> None:
    init = bootstrap_container(render(chart, CASES["bootstrap-postgres"]))
    assert init["args"][-6:] == ["--name", "gitops-admin", "--role", "org-admin", "--role", "viewer"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    assert env == {IMPORT_KEY_ENV: {"name": ADMIN_SECRET, "key": "value"},
                   "TOOLIO_SIDECAR_STORE_URL": {"name": "toolio-db", "key": "url"}}
    assert init["resources"] == {"requests": {"cpu": "50m"}}


def test_the_key_value_never_appears_in_the_rendered_manifests(chart: helm.Chart) -> None:
    value = generate_key().full
    files = render_files(chart, CASES["bootstrap-postgres"])
    text = "".join(files.values())
    assert not re.search(r"tak_[0-9A-Za-z]{46}", text)
    # The chart takes a Secret's name, never a value: a value passed in values is refused.
    for wrong in ({"adminKey": value}, {"value": value}):
        with pytest.raises(helm.HelmValuesError, match="bootstrap"):
            render(chart, {"bootstrap": {"adminKeySecret": ADMIN_SECRET, **wrong}})


def test_the_init_containers_command_imports_a_key_with_the_rendered_config(
        chart: helm.Chart, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered init container's own arguments and the rendered config, run by the real CLI
    (twice, as on two pod starts)."""
    manifests = render(chart, {**CASES["bootstrap"], "config": {"argon2": {"memory_cost_kib": 1024, "time_cost": 1}}})
    (tmp_path / "signing-key.pem").write_bytes(base64.b64decode(find(manifests, "Secret")["data"]["signing-key.pem"]))
    config = find(manifests, "ConfigMap")["data"]["config.toml"]
    config = config.replace(SIGNING_DIR, str(tmp_path)).replace('"/data"', json.dumps(str(tmp_path / "data")))
    (tmp_path / "config.toml").write_text(config)
    args = [str(tmp_path / "config.toml") if a == "/etc/toolio-sidecar/config.toml" else a
            for a in bootstrap_container(manifests)["args"]]
    value = generate_key().full
    monkeypatch.setenv(IMPORT_KEY_ENV, value)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    results = []
    for _ in range(2):
        code = main([*args, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert value not in out + err
        results.append(json.loads(out))
    assert [r["imported"] for r in results] == [True, False]
    assert results[0]["name"] == "bootstrap-admin"
    assert results[0]["permissions"] == ["org:settings"]


def test_notes_tell_where_the_bootstrap_key_comes_from(chart: helm.Chart) -> None:
    text = notes(chart, CASES["bootstrap"])
    assert f'"bootstrap-admin", is imported from Secret {ADMIN_SECRET}' in text
    assert f"get secret {ADMIN_SECRET} -o jsonpath='{{.data.key}}' | base64 -d" in text
    assert "keys create --name ops" not in text
    assert "import one from a Secret: see `bootstrap`" in notes(chart, {})


def admin_port_peers(manifests: list[Manifest]) -> list[Manifest] | None:
    policy = find(manifests, "NetworkPolicy", FULLNAME)
    rules = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 9090]
    if not rules:
        return None
    [rule] = rules
    peers: list[Manifest] = rule["from"]
    return peers


def test_with_a_service_monitor_the_network_policy_admits_prometheus_to_the_admin_port(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["networkpolicy-servicemonitor"])
    assert admin_port_peers(manifests) == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    assert find(manifests, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"
    # Without the ServiceMonitor the admin port stays closed to every pod.
    assert admin_port_peers(render(chart, {"networkPolicy": {"enabled": True}})) is None


def test_metrics_and_admin_peers_share_the_admin_port_rule(chart: helm.Chart) -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ops = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}
    values = {"serviceMonitor": {"enabled": True},
              "networkPolicy": {"enabled": True, "adminFrom": [ops], "metricsFrom": [monitoring]}}
    assert admin_port_peers(render(chart, values)) == [ops, monitoring]


def test_notes_warn_loudly_when_the_network_policy_blocks_prometheus(chart: helm.Chart) -> None:
    blocked = {"serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": True, "metricsFrom": []}}
    assert admin_port_peers(render(chart, blocked)) is None
    assert "WARNING: PROMETHEUS CANNOT SCRAPE THIS RELEASE" in notes(chart, blocked)
    assert "PROMETHEUS CANNOT SCRAPE" not in notes(chart, CASES["networkpolicy-servicemonitor"])
    assert "admits networkPolicy.metricsFrom to the admin port" in notes(chart, CASES["networkpolicy-servicemonitor"])
