"""Admin routes: placeholder until the admin API lands."""

from __future__ import annotations

from aiohttp import web

from sidecar.app import Services


def install(app: web.Application, services: Services) -> None:
    """Add the admin API and page to the admin listener's app."""
    del app, services
