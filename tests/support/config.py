"""Settings and config files for a test: one base document, overridden per test.

:class:`ConfigFactory` (the ``config`` fixture) holds the base: workspace ``acme``, a data dir
under ``tmp_path``, both listeners on loopback port 0 (the harness binds whatever the kernel
gives), argon2 at 1 MiB / t=1 so tests stay fast, and the roles ``viewer``, ``org-admin`` and
``writer``. :func:`hardening_settings` is the same base with the attack tests' tighter defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.settings import Settings, settings_from_mapping
from tests.support.raw import LOOPBACK

ROLES: dict[str, dict[str, Any]] = {
    "viewer": {"description": "Read planning data", "permissions": ["plans:read"]},
    "org-admin": {"description": "Access organization settings, including API keys",
                  "permissions": ["org:settings"]},
    "writer": {"description": "Read and change plans", "permissions": ["plans:read", "plans:write"]},
}

# The repository's root (config.example.toml, Dockerfile, helm/ live there).
REPOSITORY = Path(__file__).resolve().parents[2]

CHEAP_ARGON2 = {"memory_cost_kib": 1024, "time_cost": 1}


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Just enough TOML for config files: scalars, lists and nested tables."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, value in data.items():
        if isinstance(value, Mapping):
            table = f"{prefix}.{json.dumps(name)}" if prefix else json.dumps(name)
            out += f"\n[{table}]\n" + to_toml(value, table)
    return out


# The store of every sidecar a test configures: "" (SQLite in data_dir) unless the test runs on
# both backends (the ``both_stores`` fixture, tests/conftest.py, puts a PostgreSQL URL here).
STORE: dict[str, str] = {"url": ""}


@dataclass
class ConfigFactory:
    """Settings for one test: a data dir under ``tmp_path``, cheap argon2, three roles."""

    tmp_path: Path

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "data"

    @property
    def database(self) -> Path:
        return self.data_dir / "sidecar.db"

    def mapping(self, overrides: Mapping[str, Any] | None = None, *, cheap_argon2: bool = True) -> dict[str, Any]:
        base: dict[str, Any] = {
            "workspace": "acme",
            "data_dir": str(self.data_dir),
            # Port 0: the harness reads the ports the kernel chose. A config file for a real
            # ``serve`` process names free ports instead (support.processes.Deployment).
            "proxy": {"listen": f"{LOOPBACK}:0", "upstream": f"http://{LOOPBACK}:9"},
            "admin": {"listen": f"{LOOPBACK}:0"},
            "roles": ROLES,
        }
        if cheap_argon2:
            base["argon2"] = dict(CHEAP_ARGON2)
        if STORE["url"]:
            base["store"] = {"url": STORE["url"]}
        return deep_merge(base, overrides or {})

    def settings(self, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                 *, cheap_argon2: bool = True) -> Settings:
        return settings_from_mapping(self.mapping(overrides, cheap_argon2=cheap_argon2), environ or {},
                                     base_dir=self.tmp_path)

    def write(self, overrides: Mapping[str, Any] | None = None, name: str = "config.toml",
              raw: Mapping[str, Any] | None = None) -> Path:
        """Write a TOML config file; ``raw`` replaces the whole document (for bad configs)."""
        path = self.tmp_path / name
        path.write_text(to_toml(raw if raw is not None else self.mapping(overrides)))
        return path


def hardening_settings(tmp_path: Path, upstream: str, *, cheap_argon2: bool = True,
                       **sections: Mapping[str, Any]) -> Settings:
    """The base settings with the attack tests' defaults (short grace, a 5 s upstream timeout,
    last-used flushed only once a minute); ``sections`` override tables, e.g.
    ``proxy={"max_body_bytes": 10}``."""
    document: dict[str, Any] = {
        "log_level": "warning",
        "shutdown_grace_seconds": 1,
        "proxy": {"upstream": upstream, "upstream_timeout_seconds": 5},
        "auth": {"last_used_flush_seconds": 60},
    }
    return ConfigFactory(tmp_path).settings(deep_merge(document, sections), cheap_argon2=cheap_argon2)
