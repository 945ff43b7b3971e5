"""config.example.toml documents every setting with its default (issue: operations 7)."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

from sidecar.settings import Settings, load_settings, settings_from_mapping
from tests.support.config import REPOSITORY

EXAMPLE = REPOSITORY / "config.example.toml"
# Fields that are not config keys: derived at load time or given through the environment.
NOT_IN_FILE = {"signing.env_keys"}


def _setting_names(cls: type[Any], prefix: str = "") -> set[str]:
    names: set[str] = set()
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        if name == "roles":
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if prefix == "" and dataclasses.is_dataclass(default):
            names |= _setting_names(type(default), name + ".")
        else:
            names.add(name)
    return names - NOT_IN_FILE


def _example_names(table: dict[str, Any], prefix: str = "") -> set[str]:
    names: set[str] = set()
    for key, value in table.items():
        if prefix == "" and key == "roles":
            continue
        if isinstance(value, dict):
            names |= _example_names(value, prefix + key + ".")
        else:
            names.add(prefix + key)
    return names


def test_every_setting_in_code_is_documented_in_the_example() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    # A mode that replaces a setting (``[workspaces]`` instead of ``workspace``) is shown as a
    # commented-out table; test_the_commented_workspaces_table_loads_in_place_of_workspace loads it.
    commented = {line[3:-1] for line in EXAMPLE.read_text().splitlines() if line.startswith("# [")}
    missing = _setting_names(Settings) - _example_names(example) - commented
    assert not missing, f"settings missing from config.example.toml: {sorted(missing)}"


def test_the_commented_workspaces_table_loads_in_place_of_workspace() -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [workspaces]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    text = "\n".join(line for line in lines if not line.startswith("workspace = "))
    settings = settings_from_mapping(tomllib.loads(text + "\n" + "\n".join(block) + "\n"), {})
    assert settings.workspaces is not None
    assert settings.workspaces.from_host == "{workspace}.toolio.com"


def test_the_example_shows_the_defaults_and_loads() -> None:
    example = load_settings(EXAMPLE, {})
    defaults = Settings()
    for section in ("proxy", "auth", "argon2", "admin", "signing", "audit"):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.workspace == defaults.workspace
    assert example.log_level == defaults.log_level
    assert example.shutdown_grace_seconds == defaults.shutdown_grace_seconds
    assert sorted(example.roles) == ["org-admin", "viewer"]
