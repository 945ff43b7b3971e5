"""Shared fixtures: config and settings for a test, running sidecars, the upstreams they front.

* ``config``: :class:`ConfigFactory` (data dir under ``tmp_path``; argon2 at 1 MiB / t=1 so
  tests stay fast; roles ``viewer``, ``org-admin``, ``writer``);
* ``start_sidecar``: ``await start_sidecar(settings)`` runs ``create_app(settings)`` on free
  ports through ``sidecar.runtime.server.PublicServer`` / ``runner_for`` and returns a :class:`RunningSidecar`;
* ``echo``: a recording aiohttp upstream (:class:`EchoUpstream`);
* ``mcp_upstream``: the bundled example MCP server (official SDK) base URL;
* ``sidecar``: a sidecar in front of ``echo`` with the default test settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp_support import example_upstream
from sidecar_support import ConfigFactory, EchoUpstream, RunningSidecar, SidecarStarter, run_echo_upstream


@pytest.fixture
def config(tmp_path: Path) -> ConfigFactory:
    return ConfigFactory(tmp_path)


@pytest.fixture
async def start_sidecar() -> AsyncIterator[SidecarStarter]:
    starter = SidecarStarter()
    try:
        yield starter
    finally:
        await starter.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    async with run_echo_upstream() as upstream:
        yield upstream


@pytest.fixture
async def mcp_upstream() -> AsyncIterator[str]:
    async with example_upstream() as base_url:
        yield base_url


@pytest.fixture
async def sidecar(config: ConfigFactory, start_sidecar: SidecarStarter, echo: EchoUpstream) -> RunningSidecar:
    return await start_sidecar(config.settings({"proxy": {"upstream": echo.url}}))
