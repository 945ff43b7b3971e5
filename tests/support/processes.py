"""The sidecar as deployed: the CLI and ``toolio-sidecar serve`` in processes of their own.

* :func:`run_cli` runs ``python -m sidecar ARGS`` (or the console script) to completion;
* :class:`Deployment` is a config file and data dir naming two free loopback ports;
* :func:`serving` runs ``serve`` for it until the block ends (killed if still up), ready first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.config import ConfigFactory, deep_merge
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, free_port


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def start_cli(*args: str, program: str | None = None, env: Mapping[str, str] | None = None,
                    cwd: Path | None = None, stdin: bool = False) -> asyncio.subprocess.Process:
    """``python -m sidecar ARGS`` (or ``program ARGS``), started, output (and with ``stdin``, input) piped."""
    command = [program] if program is not None else [sys.executable, "-m", "sidecar"]
    return await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE if stdin else None, env=dict(env) if env is not None else None, cwd=cwd)


async def run_cli(*args: str, program: str | None = None, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None, stdin: bytes | None = None) -> CliResult:
    """``python -m sidecar ARGS`` (or ``program ARGS``) in another process, to its end; ``stdin``
    is written to its standard input."""
    proc = await start_cli(*args, program=program, env=env, cwd=cwd, stdin=stdin is not None)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


@dataclass
class Deployment:
    """A config file and data dir for ``toolio-sidecar serve`` on two free loopback ports:
    the test base (:class:`ConfigFactory`) with a short grace period, ``overrides`` on top."""

    root: Path
    upstream: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    proxy_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.write_config()

    @property
    def factory(self) -> ConfigFactory:
        return ConfigFactory(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def database(self) -> Path:
        return self.factory.database

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    def write_config(self) -> None:
        self.factory.write(deep_merge({
            "log_level": "warning",
            "shutdown_grace_seconds": 1,
            "proxy": {"listen": f"{LOOPBACK}:{self.proxy_port}", "upstream": self.upstream},
            "admin": {"listen": f"{LOOPBACK}:{self.admin_port}"},
        }, self.overrides), name=self.config.name)

    async def start_cli(self, *args: str) -> asyncio.subprocess.Process:
        """``keys VERB --config <this config> ARGS...``, started."""
        return await start_cli(*args[:2], "--config", str(self.config), *args[2:], cwd=self.root)

    async def cli(self, *args: str) -> CliResult:
        """``keys VERB --config <this config> ARGS...`` to its end."""
        return await run_cli(*args[:2], "--config", str(self.config), *args[2:], cwd=self.root)

    async def create_key(self, name: str, role: str, *extra: str) -> dict[str, Any]:
        """A key made by the CLI, as its ``--json`` output (with the full key)."""
        result = await self.cli("keys", "create", "--name", name, "--role", role, "--json", *extra)
        assert result.returncode == 0, result.stderr
        created: dict[str, Any] = result.json()
        return created


async def wait_ready(deployment: Deployment, process: asyncio.subprocess.Process) -> None:
    async def ready() -> bool:
        assert process.returncode is None, deployment.log_path.read_text()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=2)) as client,
                        client.get(deployment.admin_url + "/readyz") as response):
                return response.status == 200
        return False

    await eventually(ready, within=30, interval=0.05, what="toolio-sidecar serve ready")


@contextlib.asynccontextmanager
async def serving(deployment: Deployment) -> AsyncIterator[asyncio.subprocess.Process]:
    """``toolio-sidecar serve`` for ``deployment`` (its output to ``serve.log``), once ready;
    killed at the end of the block unless it already exited."""
    with deployment.log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--config", str(deployment.config),
            stdout=log, stderr=log, cwd=deployment.root, start_new_session=True)
        try:
            await wait_ready(deployment, process)
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
