"""The admin listener's operational endpoints (``/healthz``, ``/readyz``, ``/metrics``, the JWKS);
the ``admin`` package adds the key-management API and page to the same aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.runtime.services import Services
from sidecar.runtime.web import json_response

# The admin app's handlers find the shared services under this key (admin reads it too).
SERVICES: web.AppKey[Services] = web.AppKey("services")


async def healthz(_: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def jwks(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    assert services.signer is not None
    return web.Response(body=services.signer.jwks_body, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=300"})


def _services_ctx(services: Services) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(_: web.Application) -> AsyncIterator[None]:
        await services.acquire()
        try:
            yield
        finally:
            await services.release()
    return ctx


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.draining:
        return json_response(503, {"status": "draining"})
    try:
        await asyncio.wait_for(services.store.ping(), timeout=2.0)
    except Exception:
        return json_response(503, {"status": "store unavailable"})
    return json_response(200, {"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    services.metrics.cache_size.set(len(services.cache))
    return web.Response(body=generate_latest(services.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_ops_app(services: Services) -> web.Application:
    """The admin listener's operational endpoints; the key-management UI and API are added by
    the ``admin`` package (``admin.app.install``)."""
    app = web.Application(client_max_size=64 * 1024)
    app[SERVICES] = services
    app.cleanup_ctx.append(_services_ctx(services))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/.well-known/jwks.json", jwks)
    return app
