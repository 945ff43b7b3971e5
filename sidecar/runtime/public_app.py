"""The public listener's application: ``GET /healthz``, the JWKS and the OAuth discovery paths
answered here without auth; every other request goes to the proxy handler.

The discovery paths (RFC 9728 protected resource metadata, RFC 8414 authorization server
metadata, OpenID Connect discovery, and everything below each) depend on ``oauth.mode``
(docs/reference/config.md, [oauth]):

* ``off``: a JSON 404 for any method, so MCP clients using keys learn at once that there is no
  OAuth here;
* ``pass-through``: ``GET``, ``HEAD`` and ``OPTIONS`` go to the upstream, which does its own OAuth
  (without any key, identity header or Authorization other than a non-key Bearer token); other
  methods get 405;
* ``validate``: this sidecar is the resource server: ``/.well-known/oauth-protected-resource``
  and the same path suffixed with the resource's path answer its metadata; the rest 404 (the
  authorization server publishes its own metadata, at the issuer).
"""

from __future__ import annotations

import json
import re

from sidecar.errors import MalformedCredentials
from sidecar.gate.authenticator import credential_in_query
from sidecar.http.server import Request
from sidecar.proxy.handler import send_error
from sidecar.runtime.services import Services

# OAuth discovery paths (RFC 9728, RFC 8414, OIDC Discovery); see the module docstring.
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
            await self._discovery(request, path, method)
        else:
            proxy = self.services.proxy
            assert proxy is not None
            await proxy(request)


    async def _discovery(self, request: Request, path: str, method: str) -> None:
        oauth = self.services.oauth
        if oauth.mode == "pass-through":
            if method not in _METADATA_METHODS:
                request.respond(405, "Method Not Allowed", (*_JSON, _ALLOW), _NOT_ALLOWED)
                return
            if _UNPLAIN_TARGET.search(request.raw_path.partition("?")[0]):
                # Forwarded without credentials, so only a plain metadata path: no dot segment,
                # encoded slash or backslash, or empty segment, which an upstream that resolves
                # them (RFC 3986 5.2.4) would read as another of its routes.
                request.respond(404, "Not Found", _JSON, _NOT_HERE)
                return
            if credential_in_query(request.query_string):
                # A key never passes, not even in the query of a request that needs none.
                send_error(request, MalformedCredentials(
                    "API keys are accepted only in the Authorization header, never in the query string"))
                return
            proxy = self.services.proxy
            assert proxy is not None and oauth.passthrough is not None
            await proxy(request, oauth.passthrough)
        elif oauth.mode == "validate" and path in oauth.metadata_paths:
            if method in ("GET", "HEAD"):
                request.respond(200, "OK", _METADATA_HEADERS, oauth.metadata_body)
            elif method == "OPTIONS":
                # A CORS preflight from a browser-based MCP client: public metadata, any origin.
                request.respond(204, "No Content", _PREFLIGHT, b"")
            else:
                request.respond(405, "Method Not Allowed", (*_JSON, _ALLOW), _NOT_ALLOWED)
        else:
            # Never forwarded upstream or answered with an auth challenge.
            request.respond(404, "Not Found", _JSON, _NOT_OAUTH if oauth.mode == "off" else _NOT_HERE)


_DISCOVERY_TREES = tuple(prefix + "/" for prefix in DISCOVERY_PREFIXES)


# In a raw target's path: a "." or ".." segment, plain or percent-encoded, an encoded "/" or "\\",
# a backslash, or an empty segment.
_UNPLAIN_TARGET = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)|%2f|%5c|\\|//", re.IGNORECASE)


_METADATA_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


_ALLOW = ("Allow", "GET, HEAD, OPTIONS")


_CORS = (("Access-Control-Allow-Origin", "*"),)


_METADATA_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "public, max-age=300"), *_CORS)


_PREFLIGHT = (*_CORS, ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
              ("Access-Control-Allow-Headers", "MCP-Protocol-Version"), ("Access-Control-Max-Age", "600"))


_JSON = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


_JWKS_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "public, max-age=300"))


_OK = json.dumps({"status": "ok"}).encode()


_NOT_FOUND = json.dumps({"error": "not_found", "error_description": "Not Found"}).encode()


_NOT_ALLOWED = json.dumps({"error": "method_not_allowed",
                           "error_description": "OAuth discovery paths take GET, HEAD and OPTIONS"}).encode()


_NOT_HERE = json.dumps({
    "error": "not_found",
    "error_description": "No such metadata here; the authorization server publishes its own at its issuer"}).encode()


_NOT_OAUTH = json.dumps({
    "error": "not_found",
    "error_description": "This server uses API keys (Authorization: Bearer tak_...), not OAuth"}).encode()
