"""The Helm chart with several replicas on a shared PostgreSQL store (docs/operations.md).

Rendered by the real Helm engine (helm-python-sdk) and validated strictly against the
Kubernetes 1.33 OpenAPI schemas (kubernetes-validate), like tests/deploy/test_helm_chart.py,
through the same helpers (tests/support/helm.py).
"""

from __future__ import annotations

import base64
import math
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from sidecar.settings import REDIS_URL_ENV, STORE_URL_ENV, load_settings
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

MIGRATE_NAME = f"{FULLNAME}-migrate"
CONFIG_PATH = "/etc/toolio-sidecar/config.toml"
DB_SECRET = "toolio-db"
# What an operator keeps in the Secret; it must never reach the chart's values or manifests.
DB_URL = "postgresql://toolio:s3cr%40t-pw@db.example.internal:5432/toolio?sslmode=require"


POSTGRES = {"type": "postgres", "postgres": {"existingSecret": DB_SECRET}}

CASES: dict[str, dict[str, Any]] = {
    "postgres-sidecar-3": {
        "mode": "sidecar",
        "replicaCount": 3,
        "store": POSTGRES,
        "mcpServer": {"image": {"repository": "example/planning-mcp", "tag": "1.4.2"}},
    },
    "postgres-standalone-hpa": {
        "mode": "standalone",
        "upstream": {"url": "http://planning-mcp.mcp.svc.cluster.local:8000"},
        "store": {"type": "postgres", "postgres": {"existingSecret": "toolio-db-app", "secretKey": "uri"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 60},
    },
    "postgres-sidecar-hpa-spread": {
        "mode": "sidecar",
        "store": POSTGRES,
        "mcpServer": {"resources": {"requests": {"cpu": "250m", "memory": "256Mi"}}},
        "autoscaling": {
            "enabled": True,
            "targetCPUUtilizationPercentage": None,
            "targetMemoryUtilizationPercentage": 80,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        ],
        "podAntiAffinity": "hard",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        "serviceAccount": {"create": False, "name": "toolio"},
        "migrations": {"podAnnotations": {"sidecar.istio.io/inject": "false"}},
    },
}


def deployment(manifests: list[Manifest]) -> Manifest:
    return find(manifests, "Deployment", FULLNAME)


def pod_spec(manifests: list[Manifest]) -> Manifest:
    spec: Manifest = deployment(manifests)["spec"]["template"]["spec"]
    return spec


def sidecar_container(manifests: list[Manifest]) -> Manifest:
    containers: list[Manifest] = pod_spec(manifests)["containers"]
    [found] = [c for c in containers if c["name"] == "toolio-sidecar"]
    return found


def migration_job(manifests: list[Manifest]) -> Manifest:
    return find(manifests, "Job", MIGRATE_NAME)


def config_text(manifests: list[Manifest], name: str = FULLNAME) -> str:
    text: str = find(manifests, "ConfigMap", name)["data"]["config.toml"]
    return text


def env_by_name(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def scaled(value: int | str, replicas: int, *, round_up: bool) -> int:
    """An IntOrString of a PDB against `replicas` pods, as the disruption controller reads it."""
    if isinstance(value, int):
        return value
    fraction = int(value.rstrip("%")) * replicas / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


def disruptions_allowed(budget: Manifest, replicas: int) -> int:
    """PodDisruptionBudget status.disruptionsAllowed with every one of `replicas` pods healthy."""
    spec = budget["spec"]
    if "minAvailable" in spec:
        desired_healthy = scaled(spec["minAvailable"], replicas, round_up=True)
    else:
        desired_healthy = replicas - scaled(spec["maxUnavailable"], replicas, round_up=True)
    return max(0, replicas - desired_healthy)


def hook_weight(manifest: Manifest) -> int:
    return int(manifest["metadata"]["annotations"]["helm.sh/hook-weight"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_replica_cases_lint_cleanly_on_kubernetes_1_33(case: str) -> None:
    report = helm.lint(CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_replica_manifest_is_valid_for_kubernetes_1_33(chart: helm.Chart, case: str) -> None:
    manifests = render(chart, CASES[case])
    assert {"Deployment", "Job", "PodDisruptionBudget"} <= set(kinds(manifests))
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        assert manifest["metadata"]["namespace"] == NAMESPACE


def test_postgres_runs_three_sidecar_pods_without_a_volume_claim(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    assert kinds(manifests) == [
        "ConfigMap", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "Service",
        "ServiceAccount",
    ]
    assert deployment(manifests)["spec"]["replicas"] == 3
    spec = pod_spec(manifests)
    assert [c["name"] for c in spec["containers"]] == ["toolio-sidecar", "mcp-server"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    # Every replica mounts the same signing Secret, so all publish the same JWKS.
    assert volumes["signing"]["secret"]["secretName"] == f"{FULLNAME}-signing"


def test_pods_prefer_different_nodes_by_default(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    spec = pod_spec(manifests)
    [term] = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
    # One replica: no anti-affinity at all; an explicit `affinity` replaces the default.
    assert "affinity" not in pod_spec(render(chart, {}))
    custom = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mcp"]}]},
    ]}}}
    overridden = render(chart, {**CASES["postgres-sidecar-3"], "affinity": custom})
    assert pod_spec(overridden)["affinity"] == custom
    none = render(chart, {**CASES["postgres-sidecar-3"], "podAntiAffinity": "none"})
    assert "affinity" not in pod_spec(none)


def test_hard_anti_affinity_and_topology_spread_select_this_releases_pods(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-hpa-spread"])
    spec = pod_spec(manifests)
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    [required] = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert selects(required["labelSelector"]["matchLabels"], pod_labels)
    [spread] = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert selects(spread["labelSelector"]["matchLabels"], pod_labels)
    # A constraint's own labelSelector is kept as given.
    own = {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
           "labelSelector": {"matchLabels": {"tier": "mcp"}}}
    kept = pod_spec(render(chart, {**CASES["postgres-sidecar-3"], "topologySpreadConstraints": [own]}))
    assert kept["topologySpreadConstraints"] == [own]


def test_standalone_with_autoscaler_lets_the_hpa_own_the_replica_count(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-standalone-hpa"])
    assert "replicas" not in deployment(manifests)["spec"]
    assert [c["name"] for c in pod_spec(manifests)["containers"]] == ["toolio-sidecar"]
    autoscaler = find(manifests, "HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert autoscaler["spec"]["minReplicas"] == 2
    assert autoscaler["spec"]["maxReplicas"] == 6
    assert autoscaler["spec"]["metrics"] == [{
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}},
    }]
    # Utilisation is usage / request, so the request it divides by is there.
    assert sidecar_container(manifests)["resources"]["requests"]["cpu"]
    # More than one pod can run, so a budget and the anti-affinity come with it.
    assert find(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "podAntiAffinity" in pod_spec(manifests)["affinity"]


def test_autoscaler_in_sidecar_mode_needs_requests_on_the_mcp_server_too(chart: helm.Chart) -> None:
    values = {**CASES["postgres-sidecar-3"], "autoscaling": {"enabled": True}}
    with pytest.raises(helm.HelmRenderError, match=r"sidecar mode needs mcpServer\.resources\.requests\.cpu"):
        render(chart, values)
    manifests = render(chart, CASES["postgres-sidecar-hpa-spread"])
    metrics = find(manifests, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["resource"]["name"] for m in metrics] == ["memory"]
    assert find(manifests, "HorizontalPodAutoscaler")["spec"]["behavior"] == {
        "scaleDown": {"stabilizationWindowSeconds": 300},
    }


def test_autoscaler_bounds_and_metrics_are_checked(chart: helm.Chart) -> None:
    base = CASES["postgres-standalone-hpa"]
    with pytest.raises(helm.HelmRenderError, match=r"minReplicas \(4\) is greater than autoscaling.maxReplicas \(3\)"):
        render(chart, {**base, "autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 3}})
    no_metric = {"enabled": True, "targetCPUUtilizationPercentage": None}
    with pytest.raises(helm.HelmRenderError, match=r"autoscaling.enabled needs a metric"):
        render(chart, {**base, "autoscaling": no_metric})


def test_sqlite_with_two_replicas_fails_with_the_existing_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {"replicaCount": 2})
    message = str(failure.value)
    assert "replicaCount is 2" in message
    assert "sqlite store" in message
    assert "exactly 1 replica" in message


def test_postgres_without_an_existing_secret_fails_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {"store": {"type": "postgres"}, "replicaCount": 2})
    message = str(failure.value)
    assert 'store.type is "postgres" but store.postgres.existingSecret is empty' in message
    assert "postgresql:// URL" in message
    with pytest.raises(helm.HelmValuesError, match=r"/store/postgres/secretKey"):
        render(chart, {"store": {"type": "postgres", "postgres": {"existingSecret": DB_SECRET, "secretKey": ""}}})


def test_autoscaling_with_sqlite_fails_with_clear_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {"autoscaling": {"enabled": True}})
    message = str(failure.value)
    assert "autoscaling.enabled is true" in message
    assert "sqlite store" in message
    assert "store.type: postgres" in message


def test_store_url_reaches_the_pods_only_through_a_secret_reference(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    reference = {"secretKeyRef": {"name": DB_SECRET, "key": "url"}}
    pods = [("Deployment", sidecar_container(manifests)), ("Job", migration_job(manifests)["spec"]["template"]
                                                            ["spec"]["containers"][0])]
    for kind, container in pods:
        store_env = env_by_name(container)[STORE_URL_ENV]
        assert store_env == {"name": STORE_URL_ENV, "valueFrom": reference}, kind
    # The [store] table is rendered from `config.store` in both configs. Its url is empty,
    # so it is left out (empty is the default): the URL comes from the environment only.
    for name in (FULLNAME, MIGRATE_NAME):
        store = tomllib.loads(config_text(manifests, name))["store"]
        assert store == {"max_staleness_seconds": 5, "pool_size": 10}
        assert store.get("url", "") == ""
    # CloudNativePG's Secret keeps the URL under `uri`.
    cnpg = render(chart, CASES["postgres-standalone-hpa"])
    assert env_by_name(sidecar_container(cnpg))[STORE_URL_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "toolio-db-app", "key": "uri"},
    }
    # Nothing that looks like a connection URL is anywhere in the rendered release.
    for text in render_files(chart, CASES["postgres-sidecar-3"]).values():
        assert "postgresql://" not in text.replace("a postgresql:// URL", "")
        assert "postgres://" not in text


def test_a_url_in_config_store_url_is_refused(chart: helm.Chart) -> None:
    values = {**CASES["postgres-sidecar-3"], "config": {"store": {"url": DB_URL}}}
    with pytest.raises(helm.HelmRenderError, match=r"config.store.url must stay empty"):
        render(chart, values)
    with pytest.raises(helm.HelmRenderError, match=r"config.store.url must stay empty"):
        render(chart, {"config": {"store": {"url": DB_URL}}})


def test_sqlite_pods_get_no_store_url(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    assert STORE_URL_ENV not in env_by_name(sidecar_container(manifests))
    assert "Job" not in kinds(manifests)
    assert tomllib.loads(config_text(manifests))["store"].get("url", "") == ""


def test_migration_hook_job_runs_migrate_before_install_and_upgrade(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    job = migration_job(manifests)
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [migrate] = pod["containers"]
    assert migrate["args"] == ["migrate", "--config", CONFIG_PATH]
    # Same image, security context and config mount path as the serving container.
    serving = sidecar_container(manifests)
    assert migrate["image"] == serving["image"]
    assert migrate["securityContext"] == serving["securityContext"]
    assert pod["securityContext"] == pod_spec(manifests)["securityContext"]
    mounts = {m["name"]: m for m in migrate["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/toolio-sidecar", "readOnly": True}


def test_migration_job_reads_a_hook_config_map_created_before_it(chart: helm.Chart) -> None:
    # Pre-install hooks run before the release's own ConfigMap exists, so the Job mounts a
    # hook ConfigMap of its own, created first (lower weight) by the same hook events.
    manifests = render(chart, CASES["postgres-sidecar-3"])
    job = migration_job(manifests)
    hook_config = find(manifests, "ConfigMap", MIGRATE_NAME)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == MIGRATE_NAME
    config_annotations = hook_config["metadata"]["annotations"]
    assert config_annotations["helm.sh/hook"] == job["metadata"]["annotations"]["helm.sh/hook"]
    assert "before-hook-creation" in config_annotations["helm.sh/hook-delete-policy"]
    assert hook_weight(hook_config) < hook_weight(job)
    # The release's ConfigMap is an ordinary resource, never a hook.
    assert "helm.sh/hook" not in (find(manifests, "ConfigMap", FULLNAME)["metadata"].get("annotations") or {})
    # Same settings as the pods', minus the signing key files (migrate never signs, and the
    # generated signing Secret does not exist yet during a pre-install hook).
    served = tomllib.loads(config_text(manifests))
    migrating = tomllib.loads(config_text(manifests, MIGRATE_NAME))
    assert "private_key_files" not in migrating["signing"]
    del served["signing"]["private_key_files"]
    assert migrating == served


def test_migration_pod_is_not_selected_as_a_serving_pod(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    job_labels = migration_job(manifests)["spec"]["template"]["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in manifests if s["kind"] == "Service"]
    selectors.append(find(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    selectors.append(deployment(manifests)["spec"]["selector"]["matchLabels"])
    assert selectors
    for selector in selectors:
        assert not selects(selector, job_labels)


def test_migration_job_service_account_exists_before_the_release(chart: helm.Chart) -> None:
    job_pod = migration_job(render(chart, CASES["postgres-sidecar-3"]))["spec"]["template"]["spec"]
    assert job_pod["serviceAccountName"] == "default"
    assert job_pod["automountServiceAccountToken"] is False
    own = migration_job(render(chart, CASES["postgres-sidecar-hpa-spread"]))["spec"]["template"]
    assert own["spec"]["serviceAccountName"] == "toolio"
    assert own["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_migration_job_can_be_turned_off(chart: helm.Chart) -> None:
    manifests = render(chart, {**CASES["postgres-sidecar-3"], "migrations": {"enabled": False}})
    assert "Job" not in kinds(manifests)
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap"] == [FULLNAME]


def test_pod_disruption_budget_allows_one_disruption_with_three_replicas(chart: helm.Chart) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    budget = find(manifests, "PodDisruptionBudget")
    assert disruptions_allowed(budget, 3) == 1
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pod_labels = deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels)


def test_pod_disruption_budget_never_blocks_a_drain_of_a_single_replica(chart: helm.Chart) -> None:
    # By default one replica gets no budget; an explicit one still lets the pod go.
    assert "PodDisruptionBudget" not in kinds(render(chart, {}))
    budget = find(render(chart, {"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")
    assert disruptions_allowed(budget, 1) == 1
    off = {**CASES["postgres-sidecar-3"], "podDisruptionBudget": {"enabled": False}}
    assert "PodDisruptionBudget" not in kinds(render(chart, off))


def test_postgres_rolls_pods_and_sqlite_recreates_its_single_pod(chart: helm.Chart) -> None:
    rolling = deployment(render(chart, CASES["postgres-sidecar-3"]))["spec"]["strategy"]
    assert rolling == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    custom = deployment(render(chart, CASES["postgres-sidecar-hpa-spread"]))["spec"]["strategy"]
    assert custom == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    # Persistence settings do not matter with postgres: no claim, still a rolling update.
    claimed = render(chart, {**CASES["postgres-sidecar-3"], "persistence": {"existingClaim": "old-keys"}})
    assert "PersistentVolumeClaim" not in kinds(claimed)
    assert deployment(claimed)["spec"]["strategy"]["type"] == "RollingUpdate"
    sqlite = render(chart, {})
    assert deployment(sqlite)["spec"]["strategy"] == {"type": "Recreate"}
    assert "PersistentVolumeClaim" in kinds(sqlite)


def test_a_rolling_update_that_cannot_progress_is_refused(chart: helm.Chart) -> None:
    stuck = {**CASES["postgres-sidecar-3"], "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}
    with pytest.raises(helm.HelmRenderError, match=r"cannot both be 0"):
        render(chart, stuck)


def test_rendered_config_loads_with_the_store_url_from_the_environment(chart: helm.Chart, tmp_path: Path) -> None:
    manifests = render(chart, CASES["postgres-sidecar-3"])
    key_pem = base64.b64decode(find(manifests, "Secret")["data"]["signing-key.pem"])
    (tmp_path / "signing-key.pem").write_bytes(key_pem)
    environ = {STORE_URL_ENV: DB_URL}
    for name in (FULLNAME, MIGRATE_NAME):
        text = config_text(manifests, name)
        text = text.replace(SIGNING_DIR, str(tmp_path)).replace('"/data"', f'"{tmp_path / "data"}"')
        config_file = tmp_path / f"{name}.toml"
        config_file.write_text(text)
        settings = load_settings(config_file, environ)
        assert settings.store.url == DB_URL
        assert settings.store.max_staleness_seconds == 5
        assert settings.store.pool_size == 10
    tuned = {**CASES["postgres-sidecar-3"], "config": {"store": {"max_staleness_seconds": 2.5, "pool_size": 4}}}
    table = tomllib.loads(config_text(render(chart, tuned)))["store"]
    assert table == {"max_staleness_seconds": 2.5, "pool_size": 4}


def test_notes_summarise_replicas_and_store_and_warn_about_transaction_pooling(chart: helm.Chart) -> None:
    text = render_files(chart, CASES["postgres-sidecar-3"])["toolio-sidecar/templates/NOTES.txt"]
    assert "Replicas: 3 pods" in text
    assert f"Secret {DB_SECRET} (key url)" in text
    assert "direct or session-pooled connection" in text
    assert "PgBouncer" in text
    assert MIGRATE_NAME in text
    scaled_notes = render_files(chart, CASES["postgres-standalone-hpa"])["toolio-sidecar/templates/NOTES.txt"]
    assert "Replicas: 2 to 6 pods" in scaled_notes
    sqlite = render_files(chart, {})["toolio-sidecar/templates/NOTES.txt"]
    assert "Store: SQLite" in sqlite
    assert "one replica only" in sqlite


def test_schema_rejects_unknown_store_types_and_misspelt_new_values(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match=r"/store/type"):
        render(chart, {"store": {"type": "mysql"}})
    with pytest.raises(helm.HelmValuesError, match=r"maxReplica"):
        render(chart, {**CASES["postgres-standalone-hpa"], "autoscaling": {"enabled": True, "maxReplica": 3}})
    with pytest.raises(helm.HelmValuesError, match=r"podAntiAffinity"):
        render(chart, {"podAntiAffinity": "sometimes"})


def test_redis_url_reaches_the_pods_only_through_a_secret_reference_and_limits_render(chart: helm.Chart) -> None:
    values = {**CASES["postgres-sidecar-3"], "limits": {"redis": {"existingSecret": "toolio-redis"}},
              "config": {"roles": {"agent": {"description": "Agents", "permissions": ["plans:read"],
                                             "rate_limit": "600/minute"},
                                   "org-admin": {"description": "Admins", "permissions": ["org:settings"]}},
                         "limits": {"redis_failure": "closed"},
                         "proxy": {"max_concurrent_requests_per_key": 16}}}
    manifests = render(chart, values)
    assert env_by_name(sidecar_container(manifests))[REDIS_URL_ENV] == {
        "name": REDIS_URL_ENV, "valueFrom": {"secretKeyRef": {"name": "toolio-redis", "key": "url"}}}
    config = tomllib.loads(config_text(manifests, FULLNAME))
    assert config["roles"]["agent"]["rate_limit"] == "600/minute"
    assert config["limits"]["redis_failure"] == "closed"
    assert config["limits"].get("redis_url", "") == ""  # the URL comes from the environment only
    assert config["proxy"]["max_concurrent_requests_per_key"] == 16
    # Without the Secret no pod is told about Redis.
    plain = render(chart, CASES["postgres-sidecar-3"])
    assert REDIS_URL_ENV not in env_by_name(sidecar_container(plain))
    # A bad limit is refused at render time by the values schema.
    with pytest.raises(helm.HelmValuesError, match="rate_limit"):
        render(chart, {"config": {"roles": {"agent": {"permissions": [], "rate_limit": "600/day"}}}})
