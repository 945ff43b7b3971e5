"""The layering (docs/architecture.md): ``admin`` and ``demo`` import from ``sidecar``; ``sidecar``
never imports either (they join through the distribution's entry points). Inside ``sidecar``,
``http`` knows nothing of keys or MCP, the key domain knows no HTTP, and no package imports one
above it."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import sidecar
from sidecar.runtime.apps import ADMIN_ENTRY_POINTS, admin_installers


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


PACKAGE = Path(sidecar.__file__).parent


def _modules(under: Path) -> dict[str, set[str]]:
    return {str(path.relative_to(PACKAGE.parent)): _imported_modules(path) for path in sorted(under.rglob("*.py"))}


def test_no_sidecar_module_imports_admin_or_demo() -> None:
    offenders = {name: sorted(m for m in found if m.split(".")[0] in ("admin", "demo"))
                 for name, found in _modules(PACKAGE).items()}
    assert {name: found for name, found in offenders.items() if found} == {}


# Each sidecar package and what it may import from the sidecar (besides the leaf modules
# settings, logs, errors and metrics, which every layer may use).
ALLOWED = {
    "http": set(),
    "keys": {"keys"},
    "gate": {"keys", "gate", "http"},
    "proxy": {"keys", "gate", "proxy", "http"},
    "runtime": {"keys", "gate", "proxy", "http", "runtime"},
}
LEAVES = {"settings", "logs", "errors", "metrics"}


def test_each_package_imports_only_the_layers_below_it() -> None:
    broken: dict[str, list[str]] = {}
    for package, allowed in ALLOWED.items():
        for name, found in _modules(PACKAGE / package).items():
            for module in found:
                parts = module.split(".")
                if parts[0] != "sidecar" or len(parts) < 2 or parts[1] in LEAVES or parts[1] == "__main__":
                    continue
                if parts[1] not in allowed | {package}:
                    broken.setdefault(name, []).append(module)
    assert broken == {}


def test_the_http_engines_know_nothing_of_keys_or_mcp() -> None:
    for name, found in _modules(PACKAGE / "http").items():
        assert not {m for m in found if m.startswith("sidecar.") and m != "sidecar.logs"
                    and not m.startswith("sidecar.http.")}, name


def test_the_distribution_declares_the_admin_installer() -> None:
    declared = [entry.value for entry in entry_points(group=ADMIN_ENTRY_POINTS)]
    assert declared == ["admin.app:install"]
    from admin.app import install
    assert admin_installers() == [install]


def test_the_distribution_declares_the_demo_command() -> None:
    declared = [(entry.name, entry.value) for entry in entry_points(group="toolio_sidecar.commands")]
    assert declared == [("demo", "demo.command:run_demo")]
