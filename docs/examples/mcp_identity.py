"""The verified caller in your tool handlers: an ASGI middleware for an MCP server built with the
official Python SDK (docs/server-authors.md).

The middleware verifies X-Toolio-Assertion on every HTTP request (docs/examples/verify_pyjwt.py)
and refuses the request with 401 when it is missing or invalid, so only requests that came
through the sidecar reach the SDK. The verified identity rides along in the request's ASGI scope,
which the SDK hands to tool handlers as ``ctx.request_context.request``:

    @server.tool()
    def whoami(ctx: Context) -> dict:
        caller = identity(ctx)
        return {"key": caller.key_name, "may_write": "plans:write" in caller.permissions}

    app = ToolioIdentityMiddleware(server.streamable_http_app(...), verifier)

The tests run :func:`build_app` behind a real sidecar (tests/deploy/test_docs_examples.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import jwt
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from verify_pyjwt import AssertionVerifier

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY = "toolio.identity"


@dataclass(frozen=True)
class Identity:
    """Who called, as the sidecar vouches for it."""

    key_id: str
    key_name: str
    workspace: str
    roles: frozenset[str]
    permissions: frozenset[str]
    claims: dict[str, Any]


class ToolioIdentityMiddleware:
    """Verify the sidecar's assertion before the MCP SDK sees the request."""

    def __init__(self, app: ASGIApp, verifier: AssertionVerifier) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self.app(scope, receive, send)
            return
        token = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-toolio-assertion"), None)
        if token is None:
            await _refuse(send, "missing_assertion", "Requests must come through toolio-sidecar")
            return
        # The target exactly as received (the sidecar signed it undecoded, with its query).
        path_qs = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            path_qs += "?" + scope["query_string"].decode("latin-1")
        try:
            # In a thread: fetching the JWKS (first use, key rotation) is a blocking call.
            claims = await asyncio.to_thread(self.verifier.verify, token, method=scope["method"], path_qs=path_qs)
        except jwt.InvalidTokenError as exc:
            await _refuse(send, "invalid_assertion", str(exc))
            return
        scope[SCOPE_KEY] = Identity(
            key_id=claims["sub"], key_name=claims["name"], workspace=claims["ws"],
            roles=frozenset(claims["roles"]), permissions=frozenset(claims["perms"]), claims=claims)
        await self.app(scope, receive, send)


async def _refuse(send: Send, error: str, description: str) -> None:
    body = json.dumps({"error": error, "error_description": description}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def identity(ctx: Context[Any, Any]) -> Identity:
    """The verified caller of this tool call (the middleware ran before any handler)."""
    request = ctx.request_context.request
    found = getattr(request, "scope", {}).get(SCOPE_KEY)
    if not isinstance(found, Identity):
        raise PermissionError("no verified toolio identity on this request")
    return found


def build_server() -> MCPServer:
    """A small server whose tools use the caller's identity."""
    server: MCPServer = MCPServer("planning", log_level="WARNING")

    @server.tool(description="Who is calling, as the sidecar vouches for it.")
    def whoami(ctx: Context[Any, Any]) -> dict[str, Any]:
        caller = identity(ctx)
        return {"key_id": caller.key_id, "key_name": caller.key_name, "workspace": caller.workspace,
                "roles": sorted(caller.roles), "permissions": sorted(caller.permissions)}

    @server.tool(description="Change a plan; needs the plans:write permission.")
    def rename_plan(plan: str, name: str, ctx: Context[Any, Any]) -> str:
        if "plans:write" not in identity(ctx).permissions:
            # ToolError: the model reads this message (any other exception shows only "Error executing tool").
            raise ToolError("this key may not change plans (needs plans:write)")
        return f"{plan} is now called {name}"

    return server


def build_app(verifier: AssertionVerifier, allowed_hosts: list[str]) -> ASGIApp:
    """The server's Streamable HTTP app at /mcp, behind the identity middleware."""
    app = build_server().streamable_http_app(
        streamable_http_path="/mcp",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                                     allowed_hosts=allowed_hosts))
    return ToolioIdentityMiddleware(app, verifier)
