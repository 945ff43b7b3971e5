"""Shared fixtures for every test folder (the parts themselves live in ``tests/support``):

* ``config``: :class:`ConfigFactory` (data dir under ``tmp_path``; argon2 at 1 MiB / t=1 so
  tests stay fast; roles ``viewer``, ``org-admin``, ``writer``);
* ``start_sidecar``: ``await start_sidecar(settings)`` is :func:`running_sidecar` (the one
  harness), stopped at teardown; returns a :class:`RunningSidecar`;
* ``echo``: the recording upstream answering with its ``echo`` behaviour;
* ``mcp_upstream``: the bundled example MCP server (official SDK) base URL;
* ``sidecar``: a sidecar in front of ``echo`` with the default test settings;
* the PostgreSQL fixtures of ``tests.support.postgres`` (``pg_url`` ...) and ``redis_url`` of
  ``tests.support.redis``, registered here once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.config import STORE, ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter
from tests.support.postgres import fresh_schema
from tests.support.upstreams import RecordingUpstream, example_upstream, run_echo_upstream

pytest_plugins = ["tests.support.postgres", "tests.support.redis"]


@pytest.fixture(params=["sqlite", "postgresql"])
def both_stores(request: pytest.FixtureRequest, pg_database: str) -> Iterator[str]:
    """Run the test once on each store: every sidecar it configures uses SQLite in its data dir,
    then a fresh PostgreSQL schema (the same suite on both backends, docs/operations.md)."""
    if request.param == "sqlite":
        yield request.param
        return
    with fresh_schema(pg_database) as url:
        STORE["url"] = url
        try:
            yield request.param
        finally:
            STORE["url"] = ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test about the SQLite file itself (WAL, file modes, another connection's lock) runs once,
    # on SQLite: it is not run on PostgreSQL rather than reported as skipped there.
    items[:] = [item for item in items
                if not (item.get_closest_marker("sqlite_only") and "[postgresql" in item.nodeid)]


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
async def echo() -> AsyncIterator[RecordingUpstream]:
    async with run_echo_upstream() as upstream:
        yield upstream


@pytest.fixture
async def mcp_upstream() -> AsyncIterator[str]:
    async with example_upstream() as base_url:
        yield base_url


@pytest.fixture
async def sidecar(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> RunningSidecar:
    return await start_sidecar(config.settings({"proxy": {"upstream": echo.url}}))
