"""The one error tree of the sidecar and how each branch becomes a JSON response.

    SidecarError
    ├── AuthError                 RFC 6750 3.1 Bearer errors (proxy and admin API)
    │   ├── MissingCredentials    401, WWW-Authenticate: Bearer realm="toolio"
    │   ├── MalformedCredentials  400, error="invalid_request"
    │   ├── InvalidToken          401, error="invalid_token" (unknown, wrong, disabled, expired)
    │   └── RateLimited           429 + Retry-After
    ├── StoreUnavailable          503 + Retry-After: the key store cannot be read
    ├── VerificationsBusy         503 + Retry-After: the queue of keys waiting for argon2 is full
    ├── SignInUnavailable         503 + Retry-After: the authorization server's keys cannot be had
    ├── ProxyError                the proxy's own refusals and upstream failures
    │                             (400 / 403 / 413 / 502 / 503 / 504)
    ├── JsonRpcRefusal            an MCP request refused in JSON-RPC terms: 400 with a JSON-RPC
    │                             error object (e.g. -32020, routing headers that disagree)
    └── ApiError                  admin API: {"error": code, "message": text, "field": name};
                                  the key domain's own refusals (sidecar.keys.errors) become
                                  ApiErrors at the admin API's boundary (422 / 404 / 409)

Proxy-side bodies use the OAuth shape ``{"error", "error_description"}`` so that MCP clients
which understand RFC 6750 read them; admin bodies use ``{"error", "message"}``
(docs/reference/admin-api.md). No error body ever contains a key, a header value from the
client or an identity header.

Each error renders to ``(status, headers, body bytes)`` with no web framework involved; each
front end (the public listener, the admin listener's aiohttp app) turns that into its own
response, once, at its boundary.
"""

from __future__ import annotations

import json
from typing import Any

REALM = "toolio"
Fields = list[tuple[str, str]]
JSON_FIELDS: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


def json_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class SidecarError(Exception):
    status = 500
    code = "internal_error"
    # After this answer the connection is closed and nothing more of it read (a body that cannot
    # be framed, or one the sidecar will not take: RFC 9110 15.5.14).
    close = False

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}

    def headers(self) -> Fields:
        return []

    def render(self) -> tuple[int, Fields, bytes]:
        """The answer: status, header fields (JSON content type included), body bytes."""
        return self.status, [*JSON_FIELDS, *self.headers()], json_body(self.body())


class AuthError(SidecarError):
    """RFC 6750 3.1; ``reason`` is the bounded metrics label (docs/reference/metrics.md)."""

    reason = "invalid"

    def www_authenticate(self) -> str:
        return f'Bearer realm="{REALM}", error="{self.code}", error_description="{self.description}"'

    def headers(self) -> Fields:
        return [("WWW-Authenticate", self.www_authenticate())]


class MissingCredentials(AuthError):
    status = 401
    code = "invalid_request"
    reason = "missing"

    def __init__(self, description: str = "An API key is required: Authorization: Bearer tak_...") -> None:
        super().__init__(description)

    def body(self) -> dict[str, Any]:
        return {"error": "unauthorized", "error_description": self.description}

    def www_authenticate(self) -> str:
        # RFC 6750 3.1: a request with no credentials gets no error code in the challenge.
        return f'Bearer realm="{REALM}"'


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

    def headers(self) -> Fields:
        return [("Retry-After", str(self.retry_after))]


class StoreUnavailable(SidecarError):
    """The key store cannot be read, and the answer depends on it: 503, retry shortly. Never a
    key let through on a guess (docs/operations.md, Several replicas)."""

    status = 503
    code = "store_unavailable"

    def __init__(self) -> None:
        super().__init__("The key store is unavailable; retry shortly")

    def headers(self) -> Fields:
        return [("Retry-After", "1")]


class VerificationsBusy(SidecarError):
    """More keys wait for argon2 than ``auth.max_queued_verifications``: 503, retry shortly. Not
    an authentication failure and not a failure budget: the key was not looked at, and nothing
    is spent (docs/reference/status-codes.md)."""

    status = 503
    code = "verification_queue_full"
    reason = "queue_full"

    def __init__(self) -> None:
        super().__init__("Too many API keys are waiting to be verified; retry shortly")

    def headers(self) -> Fields:
        return [("Retry-After", "1")]


class SignInUnavailable(SidecarError):
    """``oauth.mode = "validate"``: an access token cannot be checked because the authorization
    server's metadata or JWKS cannot be fetched (and none is cached). Never a token let through
    unchecked (docs/reference/status-codes.md)."""

    status = 503
    code = "temporarily_unavailable"

    def __init__(self) -> None:
        super().__init__("The authorization server's signing keys are unavailable; retry shortly")

    def headers(self) -> Fields:
        return [("Retry-After", "5")]


def with_resource_metadata(fields: Fields, url: str) -> Fields:
    """RFC 9728 5.1: the Bearer challenge names the protected resource metadata, so an MCP client
    learns where to sign in from any 401 (``oauth.mode = "validate"``)."""
    return [(name, f'{value}, resource_metadata="{url}"') if name == "WWW-Authenticate" else (name, value)
            for name, value in fields]


class ProxyError(SidecarError):
    def __init__(self, status: int, code: str, description: str, *, close: bool = False) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.close = close


class JsonRpcRefusal(SidecarError):
    """A refusal an MCP client reads as a JSON-RPC error for its request (MCP 2026-07-28,
    "Routing headers": a header that disagrees with the body is HTTP 400 with code -32020)."""

    code = "invalid_request"

    def __init__(self, status: int, rpc_code: int, description: str, request_id: Any = None) -> None:
        super().__init__(description)
        self.status = status
        self.rpc_code = rpc_code
        self.request_id = request_id

    def body(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": self.request_id,
                "error": {"code": self.rpc_code, "message": self.description}}


class ApiError(SidecarError):
    """Admin API error: ``{"error": code, "message": text[, "field": name]}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.description}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body

