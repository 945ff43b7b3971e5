"""Every ``web.AppKey`` of both applications, declared once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.app import Services

SERVICES: web.AppKey[Services] = web.AppKey("services")
