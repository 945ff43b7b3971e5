"""What a plain ``pip install .`` (no extras: the container image) can import.

The test environment has every extra installed, so the child interpreter here refuses the
extras' packages (the MCP SDK, uvicorn, starlette, uvloop) at import, as a plain install would
not have them. Every module of ``sidecar`` and ``admin`` must import cleanly then, ``demo.command``
too (it loads the example server only when run), and ``demo.server`` must say which extra it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

EXTRAS_ONLY = ("mcp", "uvicorn", "starlette", "uvloop", "sse_starlette", "httpx2")

CHILD = textwrap.dedent(f"""
    import importlib, importlib.abc, json, pkgutil, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {EXTRAS_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    import sidecar, admin, demo
    imported, failed = [], {{}}
    for package in (sidecar, admin):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(module.name)
                imported.append(module.name)
            except Exception as exc:
                failed[module.name] = repr(exc)
    importlib.import_module("demo.command")
    try:
        importlib.import_module("demo.server")
        demo_server = "imported"
    except ImportError as exc:
        demo_server = str(exc)
    print(json.dumps({{"imported": imported, "failed": failed, "demo_server": demo_server}}))
""")


def test_every_module_imports_without_the_extras() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["failed"] == {}
    # The walk really covered the packages (a broken walk would pass vacuously).
    assert {"sidecar.http.server", "sidecar.keys.store.postgres", "sidecar.runtime.services",
            "sidecar.__main__", "admin.app"} <= set(result["imported"])
    assert "pip install 'toolio-sidecar[demo]'" in result["demo_server"]


def test_the_demo_command_without_the_extra_says_what_to_install() -> None:
    child = CHILD.split("import sidecar, admin, demo")[0] + textwrap.dedent("""
        from sidecar.__main__ import main
        sys.exit(main(["demo", "--once"]))
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'toolio-sidecar[demo]'" in done.stderr
    assert "Traceback" not in done.stderr
