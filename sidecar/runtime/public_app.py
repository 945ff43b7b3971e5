"""The public listener's application: ``GET /healthz``, the JWKS and the OAuth discovery probes
answered here without auth; every other request goes to the proxy handler."""

from __future__ import annotations

import json

from sidecar.http.server import Request
from sidecar.runtime.services import Services

# OAuth discovery probes (RFC 9728, RFC 8414, OIDC Discovery) answered with a JSON 404 so MCP
# clients in API-key mode learn at once that there is no authorization server here.
DISCOVERY_PREFIXES = ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server",
                      "/.well-known/openid-configuration")


class ProxyApp:
    """The public listener's application (docs/reference/headers.md): ``GET /healthz``, ``GET /.well-known/jwks.json``
    and the OAuth discovery probes are answered here without auth; every other request is the
    proxy's. No middlewares: the hot path is one handler (docs/architecture.md: a cache hit does no extra work)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(self, request: Request) -> None:
        method = request.method
        if method == "CONNECT":
            # A tunnel (RFC 9110 9.3.6) is not something an MCP server offers, and a 2xx would turn
            # the connection into one: no route takes it.
            request.respond(404, "Not Found", _JSON, _NOT_FOUND, close=True)
            return
        path = request.path  # decoded, without query or fragment: routes match it as any router's would
        if path == "/healthz" and method in ("GET", "HEAD"):
            request.respond(200, "OK", _JSON, _OK)
        elif path == "/.well-known/jwks.json" and method in ("GET", "HEAD"):
            signer = self.services.signer
            assert signer is not None
            request.respond(200, "OK", _JWKS_HEADERS, signer.jwks_body)
        elif path in DISCOVERY_PREFIXES or path.startswith(_DISCOVERY_TREES):
            # Any method: a probe is never forwarded upstream or answered with an auth challenge.
            request.respond(404, "Not Found", _JSON, _NOT_OAUTH)
        else:
            proxy = self.services.proxy
            assert proxy is not None
            await proxy(request)


_DISCOVERY_TREES = tuple(prefix + "/" for prefix in DISCOVERY_PREFIXES)


_JSON = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


_JWKS_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "public, max-age=300"))


_OK = json.dumps({"status": "ok"}).encode()


_NOT_FOUND = json.dumps({"error": "not_found", "error_description": "Not Found"}).encode()


_NOT_OAUTH = json.dumps({
    "error": "not_found",
    "error_description": "This server uses API keys (Authorization: Bearer tak_...), not OAuth"}).encode()
