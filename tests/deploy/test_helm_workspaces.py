"""The chart with many workspaces behind one release (docs/operations.md, Many workspaces):
`config.workspaces` in the rendered config.toml, the top-level `workspace` left out, a wildcard
Ingress host, the bootstrap key's workspace and the notes.

Rendered by the real Helm engine (helm-python-sdk) and validated strictly: built-in kinds against
Kubernetes 1.33 (kubernetes-validate), the HTTPRoute against the Gateway API v1 CRD schema
(tests/support/crds.py). The rendered config.toml is loaded by the sidecar's own settings loader.
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from sidecar.settings import Settings, SettingsError, settings_from_mapping
from tests.support.crds import validate_strictly
from tests.support.helm import CHART_DIR, FULLNAME, NAMESPACE, SIGNING_DIR, Manifest, find, render, render_files

POSTGRES = {"type": "postgres", "postgres": {"existingSecret": "toolio-db"}}
TEMPLATE = "{workspace}.toolio.example.com"
WILDCARD = "*.toolio.example.com"
WORKSPACES = {"from_host": TEMPLATE, "allowed": ["acme", "globex"]}

CASES: dict[str, dict[str, Any]] = {
    "wildcard-ingress": {
        "replicaCount": 2, "store": POSTGRES, "sessionAffinity": {"mode": "key"},
        "config": {"workspaces": WORKSPACES, "proxy": {"trusted_proxies": ["10.0.0.0/8"]}},
        "ingress": {"enabled": True, "className": "nginx",
                    "tls": [{"secretName": "toolio-wildcard-tls", "hosts": [WILDCARD]}],
                    "hosts": [{"host": WILDCARD, "paths": [{"path": "/", "pathType": "Prefix"}]}]},
        "bootstrap": {"adminKeySecret": "toolio-admin-key", "workspace": "acme"},
    },
    "wildcard-httproute": {
        "config": {"workspaces": {"from_host": TEMPLATE, "allowed": []}, "workspace": None},
        "httpRoute": {"enabled": True, "hostnames": [WILDCARD],
                      "parentRefs": [{"name": "public", "namespace": "gateway", "sectionName": "https"}]},
    },
}


def config_text(manifests: list[Manifest]) -> str:
    text: str = find(manifests, "ConfigMap", FULLNAME)["data"]["config.toml"]
    return text


def loaded(manifests: list[Manifest], tmp_path: Path) -> tuple[dict[str, Any], Settings]:
    """The rendered config.toml as TOML, and as the sidecar's settings loader reads it (with the
    chart's signing key and data directory moved under ``tmp_path``)."""
    key_pem = base64.b64decode(find(manifests, "Secret")["data"]["signing-key.pem"])
    (tmp_path / "signing-key.pem").write_bytes(key_pem)
    document = tomllib.loads(config_text(manifests).replace(SIGNING_DIR, str(tmp_path)))
    document["data_dir"] = str(tmp_path / "data")
    return document, settings_from_mapping(document, {})


def notes(chart: helm.Chart, values: dict[str, Any]) -> str:
    return render_files(chart, values)["toolio-sidecar/templates/NOTES.txt"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_multi_workspace_release_lints_and_is_strictly_valid_for_kubernetes_1_33(
        chart: helm.Chart, case: str) -> None:
    report = helm.lint(CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    for manifest in render(chart, CASES[case]):
        validate_strictly(manifest)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rendered_config_has_the_workspaces_table_and_no_workspace(
        chart: helm.Chart, case: str, tmp_path: Path) -> None:
    document, settings = loaded(render(chart, CASES[case]), tmp_path)
    assert "workspace" not in document  # the default `workspace: acme` is left out
    assert document["workspaces"] == {"from_host": TEMPLATE, **CASES[case]["config"]["workspaces"]}
    assert settings.multi_workspace
    assert settings.workspaces is not None
    assert settings.workspaces.from_host == TEMPLATE
    assert settings.workspaces.allowed == frozenset(CASES[case]["config"]["workspaces"]["allowed"])
    assert settings.workspace == ""


def test_the_wildcard_ingress_host_routes_every_workspace_to_the_public_service(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["wildcard-ingress"])
    ingress = find(manifests, "Ingress")
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == WILDCARD
    assert ingress["spec"]["tls"] == [{"secretName": "toolio-wildcard-tls", "hosts": [WILDCARD]}]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == FULLNAME
    assert find(manifests, "Service", FULLNAME)["spec"]["ports"][0]["targetPort"] == "proxy"
    assert find(render(chart, CASES["wildcard-httproute"]), "HTTPRoute")["spec"]["hostnames"] == [WILDCARD]


def test_the_bootstrap_key_is_imported_into_its_workspace(chart: helm.Chart) -> None:
    spec = find(render(chart, CASES["wildcard-ingress"]), "Deployment")["spec"]["template"]["spec"]
    [init] = spec["initContainers"]
    args = init["args"]
    assert args[:2] == ["keys", "import"]
    assert args[args.index("--workspace") + 1] == "acme"


def test_a_single_workspace_release_keeps_its_workspace_and_no_table(chart: helm.Chart, tmp_path: Path) -> None:
    manifests = render(chart, {"bootstrap": {"adminKeySecret": "toolio-admin-key"}})
    document, settings = loaded(manifests, tmp_path)
    assert document["workspace"] == "acme"
    assert "workspaces" not in document
    assert settings.workspace == "acme"
    assert not settings.multi_workspace
    spec = find(manifests, "Deployment")["spec"]["template"]["spec"]
    assert "--workspace" not in spec["initContainers"][0]["args"]


def test_without_the_chart_leaving_workspace_out_the_sidecar_would_refuse_the_config(
        chart: helm.Chart, tmp_path: Path) -> None:
    # Why the chart drops `workspace`: the settings loader refuses it beside [workspaces].
    document, _ = loaded(render(chart, CASES["wildcard-ingress"]), tmp_path)
    with pytest.raises(SettingsError, match=r"config: workspace: remove it"):
        settings_from_mapping({**document, "workspace": "acme"}, {})


@pytest.mark.parametrize(("values", "message"), [
    ({"config": {"workspaces": WORKSPACES}, "bootstrap": {"adminKeySecret": "toolio-admin-key"}},
     r"set bootstrap.workspace"),
    ({"config": {"workspaces": WORKSPACES, "oauth": {"mode": "validate"}}},
     r"\"validate\" cannot be combined with config.workspaces"),
    ({"bootstrap": {"adminKeySecret": "toolio-admin-key", "workspace": "globex"}},
     r"serves only config.workspace \"acme\""),
], ids=["bootstrap-without-workspace", "validate-mode", "bootstrap-of-another-workspace"])
def test_impossible_workspace_settings_fail_with_a_clear_message(
        chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


@pytest.mark.parametrize(("workspaces", "message"), [
    ({"from_host": "toolio.example.com"}, r"/config/workspaces/from_host"),             # no {workspace}
    ({"from_host": TEMPLATE, "allowed": ["Acme"]}, r"/config/workspaces/allowed/0"),   # not a lower-case label
    ({"allowed": ["acme"]}, r"/config/workspaces': missing property 'from_host'"),
    ({"from_host": TEMPLATE, "hosts": ["acme"]}, r"additional properties 'hosts'"),
], ids=["no-placeholder", "upper-case-name", "no-template", "unknown-key"])
def test_the_values_schema_refuses_a_bad_workspaces_table(
        chart: helm.Chart, workspaces: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(chart, {"config": {"workspaces": workspaces}})


def test_the_notes_say_every_workspace_host_must_reach_the_service(chart: helm.Chart) -> None:
    text = notes(chart, CASES["wildcard-ingress"])
    assert f"Workspaces: many; each request's workspace is read from its host, {TEMPLATE} (only acme, globex)." in text
    assert "URL:    https://<workspace>.toolio.example.com/<your MCP path>" in text
    assert "Every workspace's host must reach the Service" in text
    assert f"a wildcard DNS record {WILDCARD} and a wildcard Ingress host" in text
    assert "`config.workspace` must not be set in this mode" in text
    assert "Its workspace is acme" in text
    assert "https://<workspace>.toolio.example.com/" in notes(chart, CASES["wildcard-httproute"])
    made_here = notes(chart, {"config": {"workspaces": {"from_host": "mcp.{workspace}.example.com"}}})
    assert "--workspace <workspace>" in made_here
    assert "each workspace's host needs its own DNS record" in made_here
    single = notes(chart, {})
    assert "Workspaces:" not in single
    assert "--workspace" not in single
