"""The OpenAPI 3.1 description of the admin API, served at ``GET /admin/api/openapi.json``.

Kept next to the handlers and checked by the tests against the app's route table (every route
described, nothing described that is not routed) and against real responses.
"""

from __future__ import annotations

from typing import Any

from sidecar.keys.listing import DEFAULT_LIMIT, DEFAULT_SORT, MAX_LIMIT, SORTS

_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
# A rate limit (docs/reference/limits.md): N/second, N/minute or N/hour with N from 1 to 999999999.
_RATE_PATTERN = "^[1-9][0-9]{0,8}/(second|minute|hour)$"
_RATE_LIMIT = {"type": "string", "pattern": "^(unlimited|[1-9][0-9]{0,8}/(second|minute|hour))$",
               "examples": ["600/minute", "unlimited"]}
_RATE_LIMIT_OR_NULL = {**_RATE_LIMIT, "type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


_ERRORS = {
    "400": "BadRequest", "401": "Unauthorized", "403": "Forbidden", "404": "NotFound",
    "409": "Conflict", "413": "TooLarge", "422": "Invalid", "429": "RateLimited",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _error(_ERRORS[code]) for code in codes}


_KEY_ID = {"name": "id", "in": "path", "required": True, "description": "The key's id (key_...)",
           "schema": {"type": "string"}}

# GETs accept the cookie alone; unsafe methods with the cookie also need the CSRF header.
_READ_SECURITY: list[dict[str, list[str]]] = [{"bearerKey": []}, {"sessionCookie": []}]
_WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearerKey": []}, {"sessionCookie": [], "csrfToken": []}]


def _body(schema: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


def openapi_document(cookie_name: str) -> dict[str, Any]:
    """The document; ``cookie_name`` is the session cookie's name (``__Host-`` when Secure)."""
    status_change = {
        "security": _WRITE_SECURITY,
        "parameters": [_KEY_ID],
        "requestBody": {"required": False, "description": "Empty, or an empty JSON object",
                        "content": {"application/json": {"schema": {"type": "object",
                                                                    "additionalProperties": False}}}},
        "responses": {"200": _json(_ref("Key"), "The key after the change"),
                      **_errors("400", "401", "403", "404", "413", "422", "429")},
    }
    paths: dict[str, Any] = {
        "/admin/api/session": {
            "post": {
                "operationId": "login", "tags": ["session"],
                "summary": "Sign in with an admin key; sets the session cookie",
                "description": "Creates a new server-side session (a new id on every login) and sets it "
                               "in an HttpOnly, SameSite=Strict cookie. Failed attempts count against the "
                               "same failure budgets as the proxy (429 + Retry-After).",
                "security": [],
                "requestBody": _body("LoginRequest"),
                "responses": {
                    "200": {**_json(_ref("Session"), "Signed in"),
                            "headers": {"Set-Cookie": {"description": "The session cookie",
                                                       "schema": {"type": "string"}}}},
                    **_errors("400", "401", "403", "413", "422", "429"),
                },
            },
            "get": {
                "operationId": "currentSession", "tags": ["session"],
                "summary": "The current session (and its CSRF token)",
                "security": [{"sessionCookie": []}],
                "responses": {"200": _json(_ref("Session"), "The session"), **_errors("401", "403")},
            },
            "delete": {
                "operationId": "logout", "tags": ["session"], "summary": "Sign out; ends the session",
                "security": [{"sessionCookie": [], "csrfToken": []}],
                "responses": {"200": _json(_ref("LoggedOut"), "Signed out"), **_errors("401", "403")},
            },
        },
        "/admin/api/keys": {
            "get": {
                "operationId": "listKeys", "tags": ["keys"], "summary": "List keys, a page at a time",
                "description": "Filters combine. Pages are stable: keys added or changed while paging "
                               "do not shift the pages still to come.",
                "security": _READ_SECURITY,
                "parameters": [
                    {"name": "q", "in": "query", "required": False,
                     "description": "Only keys whose name contains this text (any case)",
                     "schema": {"type": "string"}},
                    {"name": "status", "in": "query", "required": False, "description": "Only keys with this status",
                     "schema": {"type": "string", "enum": ["enabled", "disabled"]}},
                    {"name": "role", "in": "query", "required": False,
                     "description": "Only keys with this role (a configured role name)",
                     "schema": {"type": "string"}},
                    {"name": "sort", "in": "query", "required": False,
                     "description": "The order: by name, creation time or last use; a leading - reverses it. "
                                    "Ties are broken by id; never-used keys come first in last_used order.",
                     "schema": {"type": "string", "default": DEFAULT_SORT,
                                "enum": [t for s in SORTS for t in (s, "-" + s)]}},
                    {"name": "limit", "in": "query", "required": False, "description": "How many keys per page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}},
                    {"name": "cursor", "in": "query", "required": False,
                     "description": "Where to continue: the previous page's next_cursor, with the same sort",
                     "schema": {"type": "string"}},
                ],
                "responses": {"200": _json(_ref("KeyList"), "One page of the workspace's keys"),
                              **_errors("400", "401", "403", "429")},
            },
            "post": {
                "operationId": "createKey", "tags": ["keys"], "summary": "Create a key",
                "description": "The response carries the full key in `key`: the only time it is ever shown.",
                "security": _WRITE_SECURITY,
                "requestBody": _body("CreateKeyRequest"),
                "responses": {"201": _json(_ref("NewKey"), "Created"),
                              **_errors("400", "401", "403", "409", "413", "422", "429")},
            },
        },
        "/admin/api/keys/{id}": {
            "get": {
                "operationId": "getKey", "tags": ["keys"], "summary": "One key",
                "security": _READ_SECURITY, "parameters": [_KEY_ID],
                "responses": {"200": _json(_ref("Key"), "The key"), **_errors("401", "403", "404", "429")},
            },
            "patch": {
                "operationId": "updateKey", "tags": ["keys"],
                "summary": "Change a key's own rate limit (a JSON merge patch, RFC 7396)",
                "description": "Members left out stay as they are. `rate_limit`: \"N/second\", \"N/minute\" "
                               "or \"N/hour\", \"unlimited\", or null to use the key's roles' limit again. "
                               "Audited as key.updated; every replica holds the key's next request to "
                               "the new limit.",
                "security": _WRITE_SECURITY, "parameters": [_KEY_ID],
                "requestBody": {"required": True, "content": {
                    "application/merge-patch+json": {"schema": _ref("UpdateKeyRequest")},
                    "application/json": {"schema": _ref("UpdateKeyRequest")}}},
                "responses": {"200": _json(_ref("Key"), "The key after the change"),
                              **_errors("400", "401", "403", "404", "413", "422", "429")},
            },
        },
        "/admin/api/keys/{id}/disable": {
            "post": {"operationId": "disableKey", "tags": ["keys"],
                     "summary": "Disable a key: refused on its next request; its open streams are closed",
                     **status_change},
        },
        "/admin/api/keys/{id}/enable": {
            "post": {"operationId": "enableKey", "tags": ["keys"],
                     "summary": "Enable a key again (same value)", **status_change},
        },
        "/admin/api/keys/{id}/rotate": {
            "post": {
                "operationId": "rotateKey", "tags": ["keys"],
                "summary": "Create a new key with the same roles; optionally schedule the old key's disable",
                "security": _WRITE_SECURITY, "parameters": [_KEY_ID],
                "requestBody": _body("RotateKeyRequest"),
                "responses": {"201": _json(_ref("RotatedKey"), "The new key (full value shown once)"),
                              **_errors("400", "401", "403", "404", "409", "413", "422", "429")},
            },
        },
        "/admin/api/keys/{id}/activity": {
            "get": {
                "operationId": "keyActivity", "tags": ["keys", "audit"],
                "summary": "A key's MCP tool calls: the last 50, and calls per tool in the last 24 hours",
                "security": _READ_SECURITY, "parameters": [_KEY_ID],
                "responses": {"200": _json(_ref("KeyActivity"), "The key's activity"),
                              **_errors("401", "403", "404", "429")},
            },
        },
        "/admin/api/roles": {
            "get": {
                "operationId": "listRoles", "tags": ["roles"], "summary": "Roles from the config",
                "security": _READ_SECURITY,
                "responses": {"200": _json(_ref("RoleList"), "The roles"), **_errors("401", "403", "429")},
            },
        },
        "/admin/api/audit": {
            "get": {
                "operationId": "listAudit", "tags": ["audit"], "summary": "Audit events, newest first",
                "security": _READ_SECURITY,
                "parameters": [
                    {"name": "limit", "in": "query", "required": False, "description": "How many events",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                    {"name": "before", "in": "query", "required": False,
                     "description": "Only events with a smaller id (pass the previous page's next_before)",
                     "schema": {"type": "integer", "minimum": 1}},
                    {"name": "action", "in": "query", "required": False,
                     "description": "Only events of this action, e.g. tool.called",
                     "schema": {"type": "string", "pattern": "^[a-z._]{1,64}$"}},
                    {"name": "key_id", "in": "query", "required": False,
                     "description": "Only events about this key (with action: both must match)",
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}},
                ],
                "responses": {"200": _json(_ref("AuditList"), "Events"), **_errors("400", "401", "403", "429")},
            },
        },
        "/admin/api/openapi.json": {
            "get": {
                "operationId": "openapi", "tags": ["meta"], "summary": "This document",
                "security": _READ_SECURITY,
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document"),
                              **_errors("401", "403", "429")},
            },
        },
    }
    key_properties: dict[str, Any] = {
        "id": {"type": "string"},
        "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        "preview": {"type": "string", "pattern": "^tak_[0-9A-Za-z]{4}\\.\\.\\.$"},
        "roles": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "permissions": {"type": "array", "items": {"type": "string"}},
        "workspace": {"type": "string"},
        "status": {"type": "string", "enum": ["enabled", "disabled"]},
        "created_at": _TIME,
        "created_by": {"type": "string"},
        "last_used_at": _TIME_OR_NULL,
        "disabled_at": _TIME_OR_NULL,
        "expires_at": _TIME_OR_NULL,
        "disable_at": {**_TIME_OR_NULL, "description": "When a disable scheduled by a rotation takes effect"},
        "rate_limit": {**_RATE_LIMIT_OR_NULL,
                       "description": "The key's own rate limit; null: its roles' (effective_rate_limit)"},
        "effective_rate_limit": {**_RATE_LIMIT,
                                 "description": "The limit its requests are held to: its own, else the most "
                                                "generous of its roles'"},
        "rate_limit_source": {"type": "string", "enum": ["key", "roles"],
                              "description": "Where effective_rate_limit comes from"},
    }
    full_key = {"type": "string", "pattern": "^tak_[0-9A-Za-z]{46}$",
                "description": "The full key. Shown only in this response; store it now."}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string", "description": "A stable code, e.g. invalid_name"},
                           "message": {"type": "string"},
                           "field": {"type": "string", "description": "The offending field or parameter"},
                           "valid_roles": {"type": "array", "items": {"type": "string"}}},
        },
        "Key": {"type": "object", "required": list(key_properties), "additionalProperties": False,
                "properties": key_properties},
        "NewKey": {"type": "object", "required": [*key_properties, "key"], "additionalProperties": False,
                   "properties": {**key_properties, "key": full_key}},
        "RotatedKey": {"type": "object", "required": [*key_properties, "key", "rotated_from", "disable_old_at"],
                       "additionalProperties": False,
                       "properties": {**key_properties, "key": full_key, "rotated_from": _ref("Key"),
                                      "disable_old_at": {**_TIME_OR_NULL,
                                                         "description": "When the old key will be disabled"}}},
        "KeyList": {"type": "object", "required": ["keys", "next_cursor"],
                    "properties": {"keys": {"type": "array", "items": _ref("Key")},
                                   "next_cursor": {"type": ["string", "null"],
                                                   "description": "Pass as cursor for the next page; "
                                                                  "null on the last page"}}},
        "CreateKeyRequest": {
            "type": "object", "required": ["name", "roles"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                         "description": "Unique within the workspace"},
                "roles": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                          "description": "Role names from GET /admin/api/roles"},
                "expires_at": {**_TIME_OR_NULL, "description": "RFC 3339 with a time zone, in the future"},
                "rate_limit": {**_RATE_LIMIT_OR_NULL,
                               "description": "The key's own rate limit; absent or null: its roles'"},
            },
        },
        "UpdateKeyRequest": {
            "type": "object", "minProperties": 1, "additionalProperties": False,
            "properties": {
                "rate_limit": {**_RATE_LIMIT_OR_NULL,
                               "description": "The key's own rate limit; null: its roles' again"},
            },
        },
        "RotateKeyRequest": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                         "description": "The new key's name (unique)"},
                "disable_old_at": {**_TIME_OR_NULL,
                                   "description": "When to disable the old key (RFC 3339, in the future)"},
            },
        },
        "Role": {"type": "object", "required": ["name", "description", "permissions", "tools", "rate_limit"],
                 "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                                "permissions": {"type": "array", "items": {"type": "string"}},
                                "tools": {"type": ["array", "null"], "items": {"type": "string"},
                                          "description": "fnmatch patterns of the MCP tools the role "
                                                         "may see and call; null: every tool"},
                                "rate_limit": {"type": ["string", "null"], "pattern": _RATE_PATTERN,
                                               "description": "Requests a key with this role may make "
                                                              "(N/second|minute|hour); null: unlimited"}}},
        "RoleList": {"type": "object", "required": ["roles"],
                     "properties": {"roles": {"type": "array", "items": _ref("Role")}}},
        "AuditEvent": {
            "type": "object",
            "required": ["id", "time", "action", "actor", "workspace", "key_id", "key_name", "client", "details"],
            "properties": {
                "id": {"type": "integer"},
                "time": _TIME,
                "action": {"type": "string", "examples": ["key.created", "key.disabled", "admin.login",
                                                          "tool.called"]},
                "actor": {"type": "string", "description": "Key name, cli, scheduler or anonymous"},
                "workspace": {"type": "string"},
                "key_id": {"type": ["string", "null"]},
                "key_name": {"type": ["string", "null"]},
                "client": {"type": ["string", "null"]},
                "details": {"type": "object"},
            },
        },
        "KeyActivity": {
            "type": "object", "required": ["key_id", "recent", "tools_24h"], "additionalProperties": False,
            "properties": {
                "key_id": {"type": "string"},
                "recent": {"type": "array", "items": _ref("AuditEvent"), "maxItems": 50,
                           "description": "The key's last tool.called events, newest first"},
                "tools_24h": {
                    "type": "array", "description": "Calls per tool in the last 24 hours, most called first",
                    "items": {"type": "object", "required": ["tool", "allowed", "denied"],
                              "additionalProperties": False,
                              "properties": {"tool": {"type": "string"},
                                             "allowed": {"type": "integer", "minimum": 0},
                                             "denied": {"type": "integer", "minimum": 0}}},
                },
            },
        },
        "AuditList": {"type": "object", "required": ["events", "next_before"],
                      "properties": {"events": {"type": "array", "items": _ref("AuditEvent")},
                                     "next_before": {"type": ["integer", "null"]}}},
        "LoginRequest": {"type": "object", "required": ["key"], "additionalProperties": False,
                         "properties": {"key": {"type": "string", "description": "An admin key (tak_...)"}}},
        "Session": {
            "type": "object",
            "required": ["actor", "key_id", "workspace", "csrf_token", "created_at", "expires_at",
                         "absolute_expires_at", "idle_timeout_seconds"],
            "properties": {
                "actor": {"type": "string", "description": "The admin key's name"},
                "key_id": {"type": "string"},
                "workspace": {"type": "string", "description": "The admin key's workspace: the only one "
                                                               "this session sees and changes"},
                "csrf_token": {"type": "string", "description": "Send as X-CSRF-Token on unsafe requests"},
                "created_at": _TIME,
                "expires_at": {**_TIME, "description": "When the session ends unless used again"},
                "absolute_expires_at": {**_TIME, "description": "When the session ends regardless"},
                "idle_timeout_seconds": {"type": "number"},
            },
        },
        "LoggedOut": {"type": "object", "required": ["logged_out"],
                      "properties": {"logged_out": {"const": True}}},
    }
    responses = {
        name: _json(_ref("Error"), text) for name, text in (
            ("BadRequest", "Malformed JSON or query parameter"),
            ("Unauthorized", "No key, a wrong key, or no live session"),
            ("Forbidden", "The key lacks the admin permission, or a cross-site / CSRF check failed"),
            ("NotFound", "No such key"),
            ("Conflict", "The name is taken"),
            ("TooLarge", "The body is larger than 64 KiB"),
            ("Invalid", "A field is invalid (the error names it)"),
            ("RateLimited", "Too many failed authentications; see Retry-After"),
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Toolio sidecar admin API",
            "version": "1",
            "description": "Manage the API keys of the signed-in admin key's workspace (with many "
                           "workspaces, another workspace's key id is 404). Errors are JSON "
                           "`{\"error\", \"message\", \"field\"?}`; every response is `Cache-Control: no-store`.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": "session"}, {"name": "keys"}, {"name": "roles"}, {"name": "audit"}, {"name": "meta"}],
        "security": _READ_SECURITY,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "bearerKey": {"type": "http", "scheme": "bearer",
                              "description": "An API key whose roles grant the admin permission"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": cookie_name,
                                  "description": "Set by POST /admin/api/session"},
                "csrfToken": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                              "description": "The session's csrf_token; required with the cookie on "
                                             "unsafe methods, together with a same-origin Origin"},
            },
        },
    }
