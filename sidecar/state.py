"""Every ``web.AppKey`` of both applications, declared once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.app import Services

SERVICES: web.AppKey[Services] = web.AppKey("services")
# For the proxy listener: returns the proxy's answer for a request the router would hand to the
# catch-all proxy route anyway, or None to let the application route it (see server.SidecarRunner).
Shortcut = Callable[[web.BaseRequest], Awaitable[web.StreamResponse] | None]
SHORTCUT: web.AppKey[Shortcut] = web.AppKey("shortcut")
