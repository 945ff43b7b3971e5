"""Release hygiene: one version everywhere, the license stated the same way in pyproject.toml and
LICENSE, and a changelog entry (CHANGELOG.md)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from prometheus_client import CollectorRegistry

import sidecar
from sidecar.__main__ import main
from sidecar.metrics import Metrics
from tests.support.config import REPOSITORY
from tests.support.metrics import sample

PROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]


def test_the_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert sidecar.__version__ == metadata.version("toolio-sidecar") == PROJECT["version"]
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"toolio-sidecar {PROJECT['version']}\n"
    registry = CollectorRegistry()
    Metrics(registry)
    assert sample(registry, "toolio_sidecar_build_info", version=PROJECT["version"]) == 1


def test_the_license_is_an_spdx_expression_backed_by_the_license_file() -> None:
    # PEP 639: a string, not the deprecated {text = ...} table; LicenseRef- for one's own terms.
    assert PROJECT["license"] == "LicenseRef-Proprietary"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPOSITORY / "LICENSE").read_text()
    assert "LicenseRef-Proprietary" in text
    assert "All rights reserved" in text
    assert metadata.metadata("toolio-sidecar")["License-Expression"] == "LicenseRef-Proprietary"


def test_the_changelog_has_the_current_version_and_an_unreleased_section() -> None:
    headings = re.findall(r"^## \[([^\]]+)\]", (REPOSITORY / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert PROJECT["version"] in headings
