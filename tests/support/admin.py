"""The admin tests' view of a running sidecar: :func:`admin_sidecar` is :func:`running_sidecar`
plus an ``ops`` admin key (made the way the CLI bootstraps one: straight into the store, actor
``cli``), an HTTP client and helpers for the admin API, and the OpenAPI schema validators.

It is an async context manager rather than a fixture so each test says which settings it
changes (small session timeouts, tight failure budgets, Secure cookies).
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from openapi_schema_validator import OAS31Validator

from admin.openapi import openapi_document
from admin.session import COOKIE_NAME, SECURE_COOKIE_NAME
from sidecar.runtime.services import Services
from sidecar.settings import Settings, settings_from_mapping
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.upstreams import example_upstream

PROTOCOL = "2025-11-25"
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def initialize_message() -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": PROTOCOL, "capabilities": {},
                       "clientInfo": {"name": "admin-tests", "version": "1"}}}


@dataclass
class AdminSidecar:
    sidecar: RunningSidecar
    admin_key: str
    admin_key_id: str
    http: aiohttp.ClientSession
    seen_bodies: list[bytes] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.sidecar.settings

    @property
    def services(self) -> Services:
        return self.sidecar.services

    @property
    def admin_app(self) -> web.Application:
        return self.sidecar.apps.admin

    @property
    def proxy_url(self) -> str:
        return self.sidecar.proxy_url

    @property
    def admin_origin(self) -> str:
        return self.sidecar.admin_url

    @property
    def log(self) -> io.StringIO:
        return self.sidecar.log_stream

    @property
    def api(self) -> str:
        return self.admin_origin + "/admin/api"

    def bearer(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    async def call(self, method: str, path: str, *, key: str | None = None, json_body: Any = None,
                   data: bytes | None = None, headers: Mapping[str, str] | None = None,
                   auth: bool = True) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One admin API call (bearer admin key unless ``auth=False``); returns status, JSON, response."""
        sent = dict(self.bearer(key) if auth else {})
        sent.update(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.api + path, data=data, headers=sent,
                                     allow_redirects=False) as resp:
            raw = await resp.read()
        self.seen_bodies.append(raw)
        body = json.loads(raw) if raw and resp.content_type == "application/json" else None
        return resp.status, body, resp

    async def create_key(self, name: str, roles: list[str]) -> dict[str, Any]:
        status, body, _ = await self.call("POST", "/keys", json_body={"name": name, "roles": roles})
        assert status == 201, body
        assert isinstance(body, dict)
        return body

    async def login(self, key: str | None = None, *,
                    headers: Mapping[str, str] | None = None) -> tuple[int, Any, str | None]:
        """POST /admin/api/session; returns status, body and the session cookie's value."""
        status, body, resp = await self.call("POST", "/session", json_body={"key": key or self.admin_key},
                                             auth=False, headers=headers)
        cookie = session_cookie(resp)
        return status, body, cookie.value if cookie is not None else None

    def cookie_header(self, value: str) -> dict[str, str]:
        name = SECURE_COOKIE_NAME if self.settings.admin.secure_cookies else COOKIE_NAME
        return {"Cookie": f"{name}={value}"}

    def same_origin(self, csrf: str | None) -> dict[str, str]:
        headers = {"Origin": self.admin_origin, "Sec-Fetch-Site": "same-origin"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        return headers

    async def proxy_status(self, key: str) -> int:
        """Status of one MCP ``initialize`` through the proxy with ``key``."""
        async with self.http.post(self.proxy_url + "/mcp", data=json.dumps(initialize_message()),
                                  headers={**self.bearer(key), **MCP_HEADERS}) as resp:
            await resp.read()
            return resp.status

    def log_lines(self) -> list[dict[str, Any]]:
        return self.sidecar.log_lines()


def session_cookie(resp: aiohttp.ClientResponse) -> Any:
    """The admin session Morsel from a response's Set-Cookie, if any."""
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            if name.endswith("toolio_admin_session"):
                return morsel
    return None


@asynccontextmanager
async def admin_sidecar(tmp_path: Path, *, admin: Mapping[str, Any] | None = None,
                        auth: Mapping[str, Any] | None = None, upstream: bool = False,
                        roles: Mapping[str, Any] | None = None,
                        workspaces: Mapping[str, Any] | None = None) -> AsyncIterator[AdminSidecar]:
    """A :func:`running_sidecar` with an ``ops`` admin key. With ``upstream`` the example MCP
    server runs behind the proxy; without, nothing listens there (admin-only tests). ``roles``
    is merged into the base roles (e.g. ``{"viewer": {"tools": ["get_*"]}}``). With
    ``workspaces`` (a ``[workspaces]`` table) the sidecar serves many workspaces and the ``ops``
    key belongs to ``acme``."""
    async with AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(example_upstream()) if upstream else "http://127.0.0.1:9"
        document = ConfigFactory(tmp_path).mapping({"log_level": "info", "proxy": {"upstream": upstream_url},
                                                    "admin": dict(admin or {}), "auth": dict(auth or {}),
                                                    "roles": dict(roles or {})})
        if workspaces is not None:
            del document["workspace"]  # one or the other (docs/reference/config.md, [workspaces])
            document["workspaces"] = dict(workspaces)
        settings = settings_from_mapping(document, {}, base_dir=tmp_path)
        sidecar = await stack.enter_async_context(running_sidecar(settings))
        record, full = await sidecar.services.keys.create(
            name="ops", roles=["org-admin"], actor="cli", client=None,
            workspace="acme" if workspaces is not None else None)
        http = await stack.enter_async_context(aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()))
        yield AdminSidecar(sidecar, admin_key=full, admin_key_id=record.id, http=http)


def spec_validator(component: str) -> OAS31Validator:
    """A validator for ``#/components/schemas/<component>`` of the served OpenAPI document."""
    document = openapi_document("toolio_admin_session")
    return OAS31Validator({"$ref": f"#/components/schemas/{component}", "components": document["components"]})


def assert_matches(component: str, body: Any) -> None:
    errors = sorted(spec_validator(component).iter_errors(body), key=str)
    assert not errors, [e.message for e in errors]
