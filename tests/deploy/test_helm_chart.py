"""The Helm chart in helm/toolio-sidecar, rendered by the real Helm engine (helm-python-sdk).

Every rendered manifest is validated against the Kubernetes 1.33 OpenAPI schemas in strict
mode (kubernetes-validate). Both libraries work offline: the chart is rendered without a
cluster, so `lookup` finds nothing and the signing key is freshly generated each render.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sidecar.settings import load_settings
from tests.support.config import REPOSITORY
from tests.support.crds import validate_strictly
from tests.support.helm import (
    CHART_DIR,
    FULLNAME,
    KUBERNETES_VERSION,
    NAMESPACE,
    SIGNING_DIR,
    Manifest,
    find,
    kinds,
    render,
    render_files,
)

ROOT = REPOSITORY
CONFIG_EXAMPLE = ROOT / "config.example.toml"
# config.toml keys the chart sets itself (from ports, mode and the signing Secret).
CHART_OWNED_KEYS = {"data_dir", "proxy.listen", "proxy.upstream", "admin.listen", "signing.private_key_files"}

# Custom resources that kubernetes-validate has no schema for; each is checked by
# check_custom_resource() instead. Any other unknown kind fails the validation.
CUSTOM_RESOURCE_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sidecar": {
        "mode": "sidecar",
        "mcpServer": {
            "image": {"repository": "example/planning-mcp", "tag": "1.4.2"},
            "port": 9000,
            "args": ["--host", "127.0.0.1", "--port", "9000"],
            "env": [{"name": "LOG_FORMAT", "value": "json"}],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            "readinessProbe": {"tcpSocket": {"port": 9000}},
        },
    },
    "standalone": {
        "mode": "standalone",
        "upstream": {"url": "http://planning-mcp.mcp.svc.cluster.local:8000"},
    },
    "extras": {
        "mode": "standalone",
        "upstream": {"url": "https://planning-mcp.mcp.svc"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}],
            "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "upstream": {"podSelector": {"app": "planning-mcp"}, "namespace": "mcp"},
        },
        "podDisruptionBudget": {"enabled": True},
        "persistence": {"storageClass": "fast-ssd", "size": "5Gi"},
        "signing": {"existingSecret": "planning-signing", "existingSecretKeys": ["new.pem", "old.pem"]},
    },
    "variants": {
        "persistence": {"enabled": False},
        "preStopSleepSeconds": 0,
        "service": {"type": "NodePort", "nodePort": 30080},
        "image": {"digest": "sha256:" + "a" * 64},
        "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
        "serviceAccount": {"create": False},
        "mcpServer": {
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
        },
    },
}


def notes(chart: helm.Chart, values: dict[str, Any]) -> str:
    return render_files(chart, values)["toolio-sidecar/templates/NOTES.txt"]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    spec: Manifest = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(manifests: list[Manifest], name: str) -> Manifest:
    containers = {c["name"]: c for c in pod_spec(manifests)["containers"]}
    found: Manifest = containers[name]
    return found


def config_toml(manifests: list[Manifest]) -> dict[str, Any]:
    return tomllib.loads(find(manifests, "ConfigMap")["data"]["config.toml"])


def check_custom_resource(manifest: Manifest) -> None:
    """The structural check for kinds kubernetes-validate cannot know (CRDs)."""
    assert set(manifest) <= {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    if manifest["kind"] == "ServiceMonitor":
        spec = manifest["spec"]
        assert spec["selector"]["matchLabels"]
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
            assert isinstance(endpoint["port"], str)
            assert endpoint["path"].startswith("/")
            assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["interval"])


def validate(manifest: Manifest) -> None:
    if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCE_KINDS:
        check_custom_resource(manifest)
        validate_strictly(manifest)  # and against the Prometheus Operator CRD's own schema
        return
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_lints_without_warnings_or_errors(case: str) -> None:
    report = helm.lint(CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == []
    assert problems == []


def test_chart_lints_on_the_oldest_supported_kubernetes_with_the_exec_sleep_fallback() -> None:
    # Before 1.30 there is no `sleep` lifecycle action; the templates fall back to exec.
    report = helm.lint(CHART_DIR, CASES["sidecar"], strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_manifest_is_valid_for_kubernetes_1_33(chart: helm.Chart, case: str) -> None:
    manifests = render(chart, CASES[case])
    assert manifests
    for manifest in manifests:
        validate(manifest)
        assert manifest["metadata"]["namespace"] == NAMESPACE or manifest["kind"] == "NetworkPolicy"


def test_defaults_render_the_sidecar_mode_resources(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    assert kinds(manifests) == [
        "ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service", "Service", "ServiceAccount",
    ]
    assert [c["name"] for c in pod_spec(manifests)["containers"]] == ["toolio-sidecar", "mcp-server"]


def test_sidecar_mode_runs_the_mcp_server_in_the_pod_and_proxies_over_loopback(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["sidecar"])
    mcp = container(manifests, "mcp-server")
    assert mcp["image"] == "example/planning-mcp:1.4.2"
    assert mcp["args"] == ["--host", "127.0.0.1", "--port", "9000"]
    assert mcp["env"] == [{"name": "LOG_FORMAT", "value": "json"}]
    assert mcp["ports"] == [{"name": "mcp", "containerPort": 9000, "protocol": "TCP"}]
    assert mcp["readinessProbe"] == {"tcpSocket": {"port": 9000}}
    assert config_toml(manifests)["proxy"]["upstream"] == "http://127.0.0.1:9000"
    # Only the sidecar's port is published; the MCP server is not reachable through a Service.
    public = find(manifests, "Service", FULLNAME)
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["proxy"]


def test_standalone_mode_runs_only_the_sidecar_and_proxies_to_upstream_url(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["standalone"])
    assert [c["name"] for c in pod_spec(manifests)["containers"]] == ["toolio-sidecar"]
    assert config_toml(manifests)["proxy"]["upstream"] == "http://planning-mcp.mcp.svc.cluster.local:8000"


def test_standalone_mode_without_upstream_url_fails_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"mode is \"standalone\" but upstream.url is empty"):
        render(chart, {"mode": "standalone", "upstream": {"url": ""}})


def test_replicas_above_one_with_sqlite_fails_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {"replicaCount": 2})
    message = str(failure.value)
    assert "replicaCount is 2" in message
    assert "sqlite store" in message
    assert "exactly 1 replica" in message


def test_sqlite_store_runs_one_pod_on_a_read_write_once_claim_and_recreates_it(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = find(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_existing_claim_is_mounted_instead_of_a_new_one(chart: helm.Chart) -> None:
    manifests = render(chart, {"persistence": {"existingClaim": "keys-pvc"}})
    assert "PersistentVolumeClaim" not in kinds(manifests)
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "keys-pvc"}
    assert find(manifests, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_without_persistence_keys_live_in_an_empty_dir_and_notes_warn(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["variants"])
    assert "PersistentVolumeClaim" not in kinds(manifests)
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert find(manifests, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "every key lives in an emptyDir" in notes(chart, CASES["variants"])


def test_pod_and_containers_run_with_restricted_security_context(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["sidecar"])
    spec = pod_spec(manifests)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["fsGroup"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    ours = container(manifests, "toolio-sidecar")["securityContext"]
    assert ours["readOnlyRootFilesystem"] is True
    assert ours["allowPrivilegeEscalation"] is False
    assert ours["capabilities"] == {"drop": ["ALL"]}
    mcp = container(manifests, "mcp-server")["securityContext"]
    assert mcp["allowPrivilegeEscalation"] is False
    assert mcp["capabilities"] == {"drop": ["ALL"]}


def test_probes_check_healthz_on_proxy_port_and_readyz_on_admin_port(chart: helm.Chart) -> None:
    ours = container(render(chart, {}), "toolio-sidecar")
    ports = {p["name"]: p["containerPort"] for p in ours["ports"]}
    assert ports == {"proxy": 8080, "admin": 9090}
    assert ours["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "proxy"}
    assert ours["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert ours["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_rendered_config_toml_parses_and_contains_roles_from_values(chart: helm.Chart) -> None:
    roles = {
        "viewer": {"description": "Read plans", "permissions": ["plans:read"], "tools": ["get_*", "search_plans"]},
        "planner": {"description": "Edit plans", "permissions": ["plans:read", "plans:write"]},
        "org-admin": {"description": "Org settings", "permissions": ["org:settings"]},
        "ops.team": {"description": "Dotted names are quoted", "permissions": ["org:settings"]},
    }
    config = config_toml(render(chart, {"config": {"workspace": "globex", "roles": roles}}))
    assert config["roles"] == roles
    assert config["workspace"] == "globex"
    assert config["data_dir"] == "/data"
    assert config["admin"]["listen"] == "0.0.0.0:9090"
    assert config["proxy"]["listen"] == "0.0.0.0:8080"
    assert config["signing"]["private_key_files"] == [f"{SIGNING_DIR}/signing-key.pem"]
    # Integers stay integers and fractions stay floats (the sidecar is strict about types).
    assert config["proxy"]["max_body_bytes"] == 10485760
    assert isinstance(config["proxy"]["max_body_bytes"], int)
    assert config["auth"]["store_poll_seconds"] == 0.25
    assert config["proxy"]["allowed_origins"] == []


def test_config_strings_are_escaped_as_toml(chart: helm.Chart) -> None:
    tricky = 'Says "hi" \\ <ok> & ünïcode\nnext line'
    roles = {"org-admin": {"description": tricky, "permissions": ["org:settings"]}}
    config = config_toml(render(chart, {"config": {"roles": roles}}))
    assert config["roles"]["org-admin"]["description"] == tricky


def test_rendered_config_is_accepted_by_the_sidecar_settings_loader(chart: helm.Chart, tmp_path: Path) -> None:
    manifests = render(chart, CASES["sidecar"])
    key_pem = base64.b64decode(find(manifests, "Secret")["data"]["signing-key.pem"])
    (tmp_path / "signing-key.pem").write_bytes(key_pem)
    text = find(manifests, "ConfigMap")["data"]["config.toml"]
    text = text.replace(SIGNING_DIR, str(tmp_path)).replace('"/data"', f'"{tmp_path / "data"}"')
    config_file = tmp_path / "config.toml"
    config_file.write_text(text)
    settings = load_settings(config_file, {})
    assert settings.workspace == "acme"


def test_chart_config_defaults_are_the_sidecars_documented_defaults(chart: helm.Chart) -> None:
    # config.example.toml documents every setting with its default (docs/reference/config.md); the chart's
    # `config` values must offer the same settings, except those the chart owns.
    example = tomllib.loads(CONFIG_EXAMPLE.read_text())
    for owned in CHART_OWNED_KEYS:
        *sections, key = owned.split(".")
        table = example
        for section in sections:
            table = table[section]
        del table[key]
    assert chart.values["config"] == example


@pytest.mark.parametrize("owned", sorted(CHART_OWNED_KEYS))
def test_chart_owned_config_keys_cannot_be_set_from_values(chart: helm.Chart, owned: str) -> None:
    *sections, key = owned.split(".")
    override: dict[str, Any] = {key: ["/elsewhere"] if key == "private_key_files" else "127.0.0.1:1"}
    for section in reversed(sections):
        override = {section: override}
    with pytest.raises(helm.HelmRenderError, match=rf"config\.{re.escape(owned)} is set by the chart"):
        render(chart, {"config": override})


def test_roles_without_the_admin_permission_fail_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"no role in config.roles grants .*\"org:settings\""):
        render(chart, {"config": {"roles": {"org-admin": None}}})


def test_generated_signing_key_is_ecdsa_p256_mounted_and_listed_in_config(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    secret = find(manifests, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = load_pem_private_key(base64.b64decode(secret["data"]["signing-key.pem"]), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["signing"]["secret"]["secretName"] == secret["metadata"]["name"]
    mounts = {m["name"]: m for m in container(manifests, "toolio-sidecar")["volumeMounts"]}
    assert mounts["signing"] == {"name": "signing", "mountPath": SIGNING_DIR, "readOnly": True}
    assert config_toml(manifests)["signing"]["algorithm"] == "ES256"


def test_existing_signing_secret_replaces_the_generated_one_newest_key_first(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["extras"])
    assert "Secret" not in kinds(manifests)
    signing = {v["name"]: v for v in pod_spec(manifests)["volumes"]}["signing"]["secret"]
    assert signing["secretName"] == "planning-signing"
    assert [item["key"] for item in signing["items"]] == ["new.pem", "old.pem"]
    assert config_toml(manifests)["signing"]["private_key_files"] == [
        f"{SIGNING_DIR}/new.pem", f"{SIGNING_DIR}/old.pem",
    ]


def test_non_es256_algorithm_needs_an_existing_secret(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"generated signing key is ECDSA P-256"):
        render(chart, {"config": {"signing": {"algorithm": "EdDSA"}}})
    eddsa = {"config": {"signing": {"algorithm": "EdDSA"}}, "signing": {"existingSecret": "ed-key"}}
    assert config_toml(render(chart, eddsa))["signing"]["algorithm"] == "EdDSA"


def test_config_change_changes_the_pod_checksum_so_pods_roll(chart: helm.Chart) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        found: dict[str, str] = find(render(chart, values), "Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]
        return found

    existing = {"signing": {"existingSecret": "fixed"}}
    first = annotations(existing)
    again = annotations(existing)
    changed = annotations({**existing, "config": {"log_level": "debug"}})
    assert re.fullmatch(r"[0-9a-f]{64}", first["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", first["checksum/secret"])
    assert first["checksum/config"] == again["checksum/config"]
    assert first["checksum/config"] != changed["checksum/config"]


def test_checksum_secret_is_computed_from_the_key_in_the_rendered_secret(chart: helm.Chart) -> None:
    # The key is generated once per render and shared with the annotation, so the checksum
    # describes the Secret actually applied, and an upgrade that keeps the key keeps the pods.
    manifests = render(chart, {})
    key = find(manifests, "Secret")["data"]["signing-key.pem"]
    annotations = find(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    hashed = json.dumps({"signing-key.pem": key}, separators=(",", ":"))
    assert annotations["checksum/secret"] == hashlib.sha256(hashed.encode()).hexdigest()


def test_shutdown_sequence_drains_before_kubernetes_kills_the_pod(chart: helm.Chart) -> None:
    manifests = render(chart, {"config": {"shutdown_grace_seconds": 20}, "preStopSleepSeconds": 5})
    spec = pod_spec(manifests)
    assert spec["terminationGracePeriodSeconds"] > 5 + 20
    ours = container(manifests, "toolio-sidecar")
    assert ours["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    # The MCP server keeps serving until the sidecar's drain is over.
    mcp = container(manifests, "mcp-server")
    assert mcp["lifecycle"]["preStop"] == {"sleep": {"seconds": 25}}
    assert spec["terminationGracePeriodSeconds"] > 25


def test_termination_grace_shorter_than_the_drain_fails_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"terminationGracePeriodSeconds \(20\) must be greater"):
        render(chart, {"terminationGracePeriodSeconds": 20})


def test_admin_port_has_its_own_cluster_ip_service(chart: helm.Chart) -> None:
    manifests = render(chart, {"service": {"type": "LoadBalancer"}})
    admin = find(manifests, "Service", f"{FULLNAME}-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    assert admin["spec"]["ports"] == [
        {"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP", "appProtocol": "http"},
    ]
    public = find(manifests, "Service", FULLNAME)
    assert public["spec"]["type"] == "LoadBalancer"
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["proxy"]


def test_service_monitor_scrapes_metrics_from_the_admin_service(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["extras"])
    monitor = find(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s["metadata"]["name"] for s in manifests
        if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()
    ]
    assert selected == [f"{FULLNAME}-admin"]


def test_network_policy_admits_proxy_port_and_admin_port_only_from_listed_peers(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["extras"])
    policy = find(manifests, "NetworkPolicy", FULLNAME)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == {8080, 9090}
    assert rules[8080]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]
    # adminFrom, then (with the ServiceMonitor on) networkPolicy.metricsFrom's default: Prometheus's pods.
    assert rules[9090]["from"] == [
        {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
    ]


def test_network_policy_without_admin_peers_keeps_admin_and_mcp_ports_closed(chart: helm.Chart) -> None:
    manifests = render(chart, {"networkPolicy": {"enabled": True}})
    policy = find(manifests, "NetworkPolicy", FULLNAME)
    # One rule, for the proxy port; a rule without `from` would admit everyone, so the admin
    # port gets none, and the MCP server's port (8000) is in no rule at all.
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_upstream_network_policy_lets_only_the_sidecar_reach_the_mcp_server(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["extras"])
    policy = find(manifests, "NetworkPolicy", f"{FULLNAME}-upstream")
    assert policy["metadata"]["namespace"] == "mcp"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "planning-mcp"}}
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 443, "protocol": "TCP"}]
    [peer] = rule["from"]
    pod_labels = find(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}


def test_pod_disruption_budget_selects_the_sidecar_pods(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["extras"])
    budget = find(manifests, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    pod_labels = find(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_schema_rejects_unknown_mode_and_misspelt_values(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match=r"/mode"):
        render(chart, {"mode": "both"})
    with pytest.raises(helm.HelmValuesError, match=r"replicas"):
        render(chart, {"replicas": 1})


def test_notes_explain_creating_the_first_admin_key_with_kubectl_exec(chart: helm.Chart) -> None:
    text = notes(chart, {})
    assert (
        f"kubectl --namespace {NAMESPACE} exec deploy/{FULLNAME} -c toolio-sidecar -- \\\n"
        "     toolio-sidecar keys create --name ops --role org-admin"
    ) in text
    assert f"port-forward svc/{FULLNAME}-admin 9090:9090" in text


def _undocumented_keys(lines: list[str]) -> list[str]:
    """Keys of values.yaml with neither a comment of their own nor an enclosing key whose
    comment starts with '# --' (which documents the whole value, e.g. a Kubernetes object)."""
    undocumented: list[str] = []
    enclosing: list[tuple[int, bool]] = []  # (indent, documented as a whole)
    comment: list[str] = []  # the comment lines right above the current line
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if match:
            indent = len(match.group(1))
            while enclosing and enclosing[-1][0] >= indent:
                enclosing.pop()
            if not (comment or any(whole for _, whole in enclosing)):
                undocumented.append(match.group(2))
            enclosing.append((indent, bool(comment) and comment[0].startswith("# --")))
        comment = []
    return undocumented


def test_values_yaml_documents_every_value() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    assert _undocumented_keys(lines) == []


def test_schema_describes_every_default_value(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> list[str]:
        missing: list[str] = []
        for key, value in values.items():
            child = node.get("properties", {}).get(key)
            if child is None:
                if node.get("additionalProperties") is False:
                    missing.append(f"{path}{key}")
                continue
            if isinstance(value, dict) and "properties" in child:
                missing.extend(walk(value, child, f"{path}{key}."))
        return missing

    assert walk(chart.values, schema, "") == []
    chart.validate_schema(chart.values)
