"""DESIGN: ``admin`` imports from ``sidecar``; ``sidecar`` never imports ``admin``. The admin API
and page join the admin listener through the distribution's entry point instead."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import sidecar
from sidecar.app import ADMIN_ENTRY_POINTS, admin_installers


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


def test_no_sidecar_module_imports_admin() -> None:
    package = Path(sidecar.__file__).parent
    offenders = {path.name: sorted(name for name in _imported_modules(path) if name.split(".")[0] == "admin")
                 for path in sorted(package.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_distribution_declares_the_admin_installer() -> None:
    declared = [entry.value for entry in entry_points(group=ADMIN_ENTRY_POINTS)]
    assert declared == ["admin.app:install"]
    from admin.app import install
    assert admin_installers() == [install]
