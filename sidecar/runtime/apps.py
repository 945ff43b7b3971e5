"""``create_app(settings)``: the public and admin applications sharing one :class:`Services`,
with the admin API and page joined through the distribution's entry point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.logs import JsonLog
from sidecar.runtime.ops_app import create_ops_app
from sidecar.runtime.public_app import ProxyApp
from sidecar.runtime.services import Services
from sidecar.settings import Settings


@dataclass(frozen=True)
class SidecarApps:
    proxy: ProxyApp
    admin: web.Application
    services: Services


def create_app(settings: Settings, *, log: JsonLog | None = None,
               registry: CollectorRegistry | None = None) -> SidecarApps:
    """Both applications, sharing one :class:`Services`; used by the CLI and every test."""
    services = Services(settings, log=log, registry=registry)
    proxy = ProxyApp(services)
    admin = create_ops_app(services)
    for install in admin_installers():
        install(admin, services)
    return SidecarApps(proxy=proxy, admin=admin, services=services)


# The admin package builds on sidecar, never the other way round (docs/architecture.md: ``sidecar`` never
# imports ``admin``): it registers its routes through this entry-point group in pyproject.toml,
# so the composition is declared by the distribution, not imported here.
ADMIN_ENTRY_POINTS = "toolio_sidecar.admin"


def admin_installers() -> list[Callable[[web.Application, Services], None]]:
    """The admin API and page installers the installed distribution declares (at least one)."""
    found = [entry.load() for entry in entry_points(group=ADMIN_ENTRY_POINTS)]
    if not found:
        # Without it the admin listener would serve no API or page: a broken install, not a mode.
        raise RuntimeError(f"no {ADMIN_ENTRY_POINTS!r} entry point: install the toolio-sidecar distribution "
                           "(pip install .) rather than running from a bare source tree")
    return found
