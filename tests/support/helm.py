"""The Helm chart as the tests render it: the real Helm engine (helm-python-sdk), a fixed
release and namespace, and helpers to pick manifests out of the result."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.support.config import REPOSITORY

CHART_DIR = REPOSITORY / "helm" / "toolio-sidecar"
KUBERNETES_VERSION = "1.33"
RELEASE = "acme"
NAMESPACE = "tools"
FULLNAME = f"{RELEASE}-toolio-sidecar"
SIGNING_DIR = "/run/secrets/toolio-sidecar/signing"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def split_documents(text: str) -> list[Manifest]:
    """Parse a rendered template (possibly several YAML documents) with Helm's own parser."""
    documents = re.split(r"^---[ \t]*$", text, flags=re.MULTILINE)
    parsed = (helm.values_from_yaml(document) for document in documents)
    return [manifest for manifest in parsed if manifest]


def render_files(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Manifest]:
    manifests: list[Manifest] = []
    for path, text in sorted(render_files(chart, values).items()):
        if path.endswith(".yaml"):
            manifests.extend(split_documents(text))
    return manifests


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and name in (None, m["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)
