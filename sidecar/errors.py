"""The one error tree of the sidecar and how each branch becomes a JSON response.

    SidecarError
    ├── AuthError                 RFC 6750 3.1 Bearer errors (proxy and admin API)
    │   ├── MissingCredentials    401, WWW-Authenticate: Bearer realm="toolio"
    │   ├── MalformedCredentials  400, error="invalid_request"
    │   ├── InvalidToken          401, error="invalid_token" (unknown, wrong, disabled, expired)
    │   └── RateLimited           429 + Retry-After
    ├── ProxyError                the proxy's own refusals and upstream failures
    │                             (400 / 403 / 413 / 502 / 503 / 504)
    └── ApiError                  admin API: {"error": code, "message": text, "field": name}
        └── NameTaken             409

Proxy-side bodies use the OAuth shape ``{"error", "error_description"}`` so that MCP clients
which understand RFC 6750 read them; admin bodies use ``{"error", "message"}`` (SPEC 5). No
error body ever contains a key, a header value from the client or an identity header.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

REALM = "toolio"


class SidecarError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def response(self) -> web.Response:
        return json_response(self.status, {"error": self.code, "error_description": self.description})


class AuthError(SidecarError):
    """RFC 6750 3.1; ``reason`` is the bounded metrics label (SPEC 7)."""

    reason = "invalid"

    def www_authenticate(self) -> str:
        return f'Bearer realm="{REALM}", error="{self.code}", error_description="{self.description}"'

    def response(self) -> web.Response:
        resp = super().response()
        resp.headers["WWW-Authenticate"] = self.www_authenticate()
        return resp


class MissingCredentials(AuthError):
    status = 401
    code = "invalid_request"
    reason = "missing"

    def __init__(self, description: str = "An API key is required: Authorization: Bearer tak_...") -> None:
        super().__init__(description)

    def response(self) -> web.Response:
        # RFC 6750 3.1: a request with no credentials gets no error code in the challenge.
        resp = json_response(self.status, {"error": "unauthorized", "error_description": self.description})
        resp.headers["WWW-Authenticate"] = f'Bearer realm="{REALM}"'
        return resp


class MalformedCredentials(AuthError):
    status = 400
    code = "invalid_request"
    reason = "malformed"


class InvalidToken(AuthError):
    status = 401
    code = "invalid_token"

    def __init__(self, reason: str = "invalid",
                 description: str = "The API key is unknown, wrong, disabled or expired") -> None:
        super().__init__(description)
        self.reason = reason


class RateLimited(AuthError):
    status = 429
    code = "rate_limited"
    reason = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed authentication attempts; retry later")
        self.retry_after = retry_after

    def response(self) -> web.Response:
        resp = json_response(self.status, {"error": self.code, "error_description": self.description})
        resp.headers["Retry-After"] = str(self.retry_after)
        return resp


class ProxyError(SidecarError):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code


class ApiError(SidecarError):
    """Admin API error: ``{"error": code, "message": text[, "field": name]}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.extra = extra or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.code, "message": self.description}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return json_response(self.status, body)


class NameTaken(ApiError):
    def __init__(self, name: str) -> None:
        super().__init__(409, "name_taken", f"a key named {name!r} already exists in this workspace", "name")


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)
    resp.headers["Cache-Control"] = "no-store"
    return resp
