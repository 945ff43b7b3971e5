"""``toolio-sidecar demo``: the bundled example MCP server, the sidecar in front of it with an
embedded SQLite store in a temporary folder, an admin key and an agent key, a real MCP call
through the sidecar as a self-check, and a ready ``mcpServers`` config block. Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sidecar.logs import JsonLog
from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.server import drain, start
from sidecar.settings import Role, Settings, settings_from_mapping


def _free_port(preferred: int) -> int:
    """``preferred`` when it can be bound on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def demo_settings(data_dir: Path, upstream: str, port: int, admin_port: int,
                  roles: Mapping[str, Role] | None = None) -> Settings:
    settings = settings_from_mapping({
        "workspace": "demo",
        "data_dir": str(data_dir),
        "shutdown_grace_seconds": 2,
        "proxy": {"listen": f"127.0.0.1:{port}", "upstream": upstream},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "roles": {
            "viewer": {"description": "Read planning data", "permissions": ["plans:read"]},
            "planner": {"description": "Read and change plans", "permissions": ["plans:read", "plans:write"]},
            "org-admin": {"description": "Access organization settings, including API keys",
                          "permissions": ["org:settings"]},
        },
    }, {})
    if roles:
        # Roles from the operator's own config, plus the two the demo's keys need.
        settings = replace(settings, roles={**{k: settings.roles[k] for k in ("org-admin", "viewer",
                                                                              "planner")}, **roles})
    return settings


async def _self_check(url: str, key: str) -> str:
    """One real MCP tools/call through the sidecar with the agent key."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, trust_env=False) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        result = await client.call_tool("add", {"a": 2, "b": 3})
        structured: Any = result.structured_content
        value = structured.get("result") if isinstance(structured, dict) else None
        return f"add(2, 3) = {value}"


async def _run(port: int, once: bool, out: Any, roles: Mapping[str, Role] | None) -> int:
    from demo.server import ExampleServerHandle

    with tempfile.TemporaryDirectory(prefix="toolio-demo-") as tmp:
        upstream = ExampleServerHandle("127.0.0.1", 0)
        await upstream.start()
        public = _free_port(port)
        admin_port = _free_port(public + 1010 if public + 1010 < 65536 else 0)
        settings = demo_settings(Path(tmp), upstream.base_url, public, admin_port, roles)
        log_path = Path(tmp) / "access.log"
        with log_path.open("w") as log_stream:
            apps: SidecarApps = create_app(settings, log=JsonLog(stream=log_stream))
            runners = await start(apps, settings)
            try:
                admin_record, admin_key = await apps.services.keys.create(
                    name="ops", roles=["org-admin"], actor="demo", client=None)
                agent_record, agent_key = await apps.services.keys.create(
                    name="demo-agent", roles=["viewer", "planner"], actor="demo", client=None)
                mcp_url = f"http://127.0.0.1:{public}/mcp"
                check = await _self_check(mcp_url, agent_key)
                config = {"mcpServers": {"toolio": {"type": "http", "url": mcp_url,
                                                    "headers": {"Authorization": f"Bearer {agent_key}"}}}}
                print(f"""
Toolio MCP key sidecar demo
  example MCP server : {upstream.url}  (unchanged; knows nothing of keys)
  sidecar (public)   : {mcp_url}
  admin page         : http://127.0.0.1:{admin_port}/admin/
  metrics            : http://127.0.0.1:{admin_port}/metrics
  data (temporary)   : {tmp}

Admin key (paste it on the admin page to log in) - {admin_record.name}, role org-admin:
  {admin_key}
Agent key - {agent_record.name}, roles viewer + planner:
  {agent_key}
These keys are shown once; the store keeps only argon2id hashes.

Self-check through the sidecar with the agent key: tools/call {check}

MCP client config (Claude / Cursor / Claude Code):
{json.dumps(config, indent=2)}

Try it:
  curl -i http://127.0.0.1:{public}/mcp                  # 401, no key
  curl -s http://127.0.0.1:{public}/.well-known/jwks.json  # the assertion's public key
""", file=out, flush=True)
                if not once:
                    print("Press Ctrl-C to stop.", file=out, flush=True)
                    stop = asyncio.Event()
                    loop = asyncio.get_running_loop()
                    import signal

                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, stop.set)
                    await stop.wait()
                    print("\nStopping...", file=out, flush=True)
            finally:
                await drain(apps, runners, settings, pre_stop_delay=0)
                await upstream.stop()
    return 0


def run_demo(port: int = 8080, once: bool = False, roles: Mapping[str, Role] | None = None) -> int:
    try:
        import mcp  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("toolio-sidecar demo needs the demo extra: pip install 'toolio-sidecar[demo]'", file=sys.stderr)
        return 2
    return asyncio.run(_run(port, once, sys.stdout, roles))
