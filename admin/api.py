"""Key endpoints of the admin API (docs/reference/admin-api.md): validate -> store (+ audit, one transaction) ->
invalidate caches and cut streams -> answer.

The work itself is :class:`sidecar.keys.KeyManager`'s, shared with the CLI; this module turns
HTTP into its calls and its results into the JSON the OpenAPI document describes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from admin.access import Access
from admin.openapi import openapi_document
from sidecar.errors import ApiError
from sidecar.keys.audit import TOOL_CALLED
from sidecar.keys.errors import InvalidInput
from sidecar.keys.listing import encode_cursor, key_query
from sidecar.keys.manager import key_json
from sidecar.keys.records import DISABLED, ENABLED, KeyRecord, to_rfc3339, utcnow
from sidecar.runtime.services import Services
from sidecar.runtime.web import json_response

API = "/admin/api"
AUDIT_DEFAULT_LIMIT = 50
AUDIT_MAX_LIMIT = 500
# A query integer is ASCII digits only: str.isdigit() and int() also accept "²" or "١٢". At most
# 18 digits, so every accepted value fits SQLite's 64-bit integers.
_QUERY_INT = re.compile(r"[0-9]{1,18}")
# Audit actions are dotted lower-case words (docs/reference/admin-api.md, Audit events).
_ACTION = re.compile(r"[a-z._]{1,64}")
# Key ids are "key_" + base62 (sidecar.keys.manager.new_key_id); the same rule as the CLI's.
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
ACTIVITY_RECENT = 50
ACTIVITY_WINDOW = timedelta(hours=24)


async def read_object(request: web.Request, allowed: Collection[str], *, empty_ok: bool = False) -> dict[str, Any]:
    """The request body as a JSON object with only ``allowed`` members, or the 400/413/422."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's own 413 is HTML; the admin API answers in JSON (docs/reference/admin-api.md).
        raise ApiError(413, "body_too_large",
                       f"the request body exceeds {request.client_max_size} bytes") from None
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        # json's decoder recurses once per nesting level: "[[[[...", well inside the size
        # bound, would otherwise end in a 500 (RFC 8259 9 lets a parser limit nesting depth).
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    except ValueError:  # also UnicodeDecodeError, and integers too long to convert
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise ApiError(422, "unknown_field",
                           f"unknown field {name!r}; expected {', '.join(sorted(allowed))}", name)
    return body


def _query_int(request: web.Request, name: str, default: int | None, minimum: int,
               maximum: int | None = None) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not _QUERY_INT.fullmatch(text):
        raise ApiError(400, "invalid_parameter", f"{name} must be a whole number", name)
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ApiError(400, "invalid_parameter", f"{name} must be at least {minimum}{bound}", name)
    return value


def _query_text(request: web.Request, name: str, rule: re.Pattern[str], expected: str) -> str | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    if not rule.fullmatch(text):
        raise ApiError(400, "invalid_parameter", f"{name} must be {expected}", name)
    return text


class KeyApi:
    def __init__(self, services: Services, access: Access) -> None:
        self._services = services
        self._settings = services.settings
        self._access = access

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # allow_head=False: the API's routes are exactly the ones the OpenAPI document lists.
        router.add_get(f"{API}/keys", self.list_keys, allow_head=False)
        router.add_post(f"{API}/keys", self.create_key)
        router.add_get(f"{API}/keys/{{id}}", self.get_key, allow_head=False)
        router.add_patch(f"{API}/keys/{{id}}", self.update_key)
        router.add_post(f"{API}/keys/{{id}}/disable", self.disable_key)
        router.add_post(f"{API}/keys/{{id}}/enable", self.enable_key)
        router.add_post(f"{API}/keys/{{id}}/rotate", self.rotate_key)
        router.add_get(f"{API}/keys/{{id}}/activity", self.key_activity, allow_head=False)
        router.add_get(f"{API}/roles", self.list_roles, allow_head=False)
        router.add_get(f"{API}/audit", self.list_audit, allow_head=False)
        router.add_get(f"{API}/openapi.json", self.openapi, allow_head=False)

    def _key(self, record: KeyRecord) -> dict[str, Any]:
        # last_used_at reaches the store in batches; show the newer in-memory time so that an
        # operator checking a rotated key's first use sees it at once (docs/reference/keys.md, rotation).
        pending = self._services.last_used.pending.get(record.id)
        if pending is not None:
            when = datetime.fromtimestamp(pending, UTC)
            if record.last_used_at is None or when > record.last_used_at:
                record = replace(record, last_used_at=when)
        return key_json(record, self._settings)

    async def list_keys(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        params = request.query
        try:
            query = key_query(caller.workspace, self._settings.roles, search=params.get("q"),
                              status=params.get("status"), role=params.get("role"), sort=params.get("sort"),
                              limit=params.get("limit"), cursor=params.get("cursor"))
        except InvalidInput as exc:
            # A query parameter, not a body field: 400 like the audit's limit (docs/reference/admin-api.md).
            raise ApiError(400, exc.code, exc.message, exc.field, exc.extra) from None
        page = await self._services.keys.page(query)
        next_cursor = encode_cursor(query, page.next) if page.next is not None else None
        return json_response(200, {"keys": [self._key(r) for r in page.keys], "next_cursor": next_cursor})

    async def create_key(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        body = await read_object(request, ("name", "roles", "expires_at", "rate_limit"))
        if "name" not in body:
            raise ApiError(422, "missing_field", "name is required", "name")
        if "roles" not in body:
            raise ApiError(422, "missing_field", "roles is required", "roles",
                           {"valid_roles": sorted(self._settings.roles)})
        record, full = await self._services.keys.create(
            name=body["name"], roles=body["roles"], expires_at=body.get("expires_at"),
            rate_limit=body.get("rate_limit"), actor=caller.name, client=caller.client, workspace=caller.workspace)
        # The full key leaves the server in this one response and is never stored (docs/reference/keys.md).
        return json_response(201, {**self._key(record), "key": full},
                             headers={"Location": f"{API}/keys/{record.id}"})

    async def get_key(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        record = await self._services.keys.get(request.match_info["id"], caller.workspace)
        return json_response(200, self._key(record))

    async def update_key(self, request: web.Request) -> web.Response:
        """A merge patch (RFC 7396) of the key's changeable fields; today only ``rate_limit``
        (docs/reference/limits.md). A member left out is left as it is; ``null`` hands the key back
        to its roles' limit."""
        caller = await self._access.caller(request)
        key_id = request.match_info["id"]
        # Unknown key or another workspace's: 404 before the body is judged, as for every key route.
        await self._services.keys.get(key_id, caller.workspace)
        body = await read_object(request, ("rate_limit",))
        if not body:
            raise ApiError(422, "missing_field", "nothing to change: send rate_limit", "rate_limit")
        record = await self._services.keys.set_rate_limit(key_id, body["rate_limit"], actor=caller.name,
                                                          client=caller.client, workspace=caller.workspace)
        return json_response(200, self._key(record))

    async def _set_status(self, request: web.Request, status: str) -> web.Response:
        caller = await self._access.caller(request)
        await read_object(request, (), empty_ok=True)
        # KeyManager.set_status invalidates the cache and cuts the key's streams before it
        # returns, so the next request with a disabled key is refused (docs/reference/keys.md: no cache delay).
        record = await self._services.keys.set_status(request.match_info["id"], status,
                                                      actor=caller.name, client=caller.client,
                                                      workspace=caller.workspace)
        return json_response(200, self._key(record))

    async def disable_key(self, request: web.Request) -> web.Response:
        return await self._set_status(request, DISABLED)

    async def enable_key(self, request: web.Request) -> web.Response:
        return await self._set_status(request, ENABLED)

    async def rotate_key(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        body = await read_object(request, ("name", "disable_old_at"))
        if "name" not in body:
            raise ApiError(422, "missing_field", "name (of the new key) is required", "name")
        new, full, old = await self._services.keys.rotate(
            request.match_info["id"], name=body["name"], disable_old_at=body.get("disable_old_at"),
            actor=caller.name, client=caller.client, workspace=caller.workspace)
        return json_response(201, {**self._key(new), "key": full, "rotated_from": self._key(old),
                                   "disable_old_at": to_rfc3339(old.disable_at)},
                             headers={"Location": f"{API}/keys/{new.id}"})

    async def list_roles(self, request: web.Request) -> web.Response:
        await self._access.caller(request)
        # tools: the role's tool-name patterns; null means every tool (docs/reference/config.md).
        # rate_limit: null means unlimited (docs/reference/limits.md).
        roles = [{"name": role.name, "description": role.description, "permissions": sorted(role.permissions),
                  "tools": None if role.tools is None else list(role.tools),
                  "rate_limit": None if role.rate_limit is None else str(role.rate_limit)}
                 for role in sorted(self._settings.roles.values(), key=lambda r: r.name)]
        return json_response(200, {"roles": roles})

    async def list_audit(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        limit = _query_int(request, "limit", AUDIT_DEFAULT_LIMIT, 1, AUDIT_MAX_LIMIT)
        before = _query_int(request, "before", None, 1)
        action = _query_text(request, "action", _ACTION, "1-64 characters of a-z . _")
        key_id = _query_text(request, "key_id", _KEY_ID, "a key id (key_...)")
        assert limit is not None
        events = await self._services.store.list_audit(caller.workspace, limit, before,
                                                       action=action, key_id=key_id)
        rows = [e.as_json() for e in events]
        # Keyset pagination: pass next_before as ?before= for the page after this one.
        next_before = rows[-1]["id"] if len(rows) == limit else None
        return json_response(200, {"events": rows, "next_before": next_before})

    async def key_activity(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request)
        record = await self._services.keys.get(request.match_info["id"], caller.workspace)  # 404 unless in it
        store, workspace = self._services.store, caller.workspace
        recent = await store.list_audit(workspace, ACTIVITY_RECENT, None, action=TOOL_CALLED, key_id=record.id)
        tools = await store.tool_activity(workspace, record.id, utcnow() - ACTIVITY_WINDOW)
        return json_response(200, {"key_id": record.id, "recent": [e.as_json() for e in recent],
                                   "tools_24h": [t.as_json() for t in tools]})

    async def openapi(self, request: web.Request) -> web.Response:
        await self._access.caller(request)
        return json_response(200, openapi_document(self._access.sessions.cookie_name))
