"""OAuth in a test: a real authorization server, and an MCP client that signs in through it.

:class:`AuthorizationServer` serves the MCP SDK's own authorization-server endpoints
(``mcp.server.auth.routes``: RFC 8414 metadata, RFC 7591 dynamic registration, ``/authorize``
with PKCE, ``/token``, ``/revoke``) on a loopback port with uvicorn, over a small in-memory
provider that issues RFC 9068 JWT access tokens signed with its RSA keys, published at
``/jwks``. The user "signed in" at it is :attr:`AuthorizationServer.user` (no login page: the
authorization endpoint approves at once, as after a real sign-in). :meth:`AuthorizationServer.mint`
signs tokens directly, with any claims, header or key, for the refusal tests; :meth:`rotate`
changes its signing key.

:func:`signed_in_client` is the official MCP client with the SDK's ``OAuthClientProvider``: it runs
the whole sign-in (401 -> protected resource metadata -> authorization server metadata ->
registration -> authorize -> token) on its own, then speaks MCP with the token.

:class:`UpstreamTokenVerifier` lets the example MCP server check tokens itself (an upstream that
does its own OAuth, behind a sidecar in pass-through mode).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.routes import build_metadata, create_auth_routes
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyHttpUrl, AnyUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.mcp import WireLog
from tests.support.raw import LOOPBACK

ACCESS_TOKEN_SECONDS = 300


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class RsaKey:
    """One of the server's signing keys."""

    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def generate(cls) -> RsaKey:
        return cls(secrets.token_hex(8), rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": _b64(numbers.n),
                "e": _b64(numbers.e)}


@dataclass
class User:
    """Who signs in at the authorization server, and the claims their tokens carry."""

    sub: str = "alice"
    roles: list[str] = field(default_factory=lambda: ["viewer"])
    claims: dict[str, Any] = field(default_factory=lambda: {"preferred_username": "alice@example.com"})


class _Provider(OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]):
    """In-memory state of the authorization server; tokens are the server's signed JWTs."""

    def __init__(self, server: AuthorizationServer) -> None:
        self._server = server
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        # The user is signed in and consents: straight back to the client with a code.
        assert client.client_id is not None
        code = AuthorizationCode(
            code=secrets.token_urlsafe(32), scopes=params.scopes or [], expires_at=time.time() + 300,
            client_id=client.client_id, code_challenge=params.code_challenge, redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly, resource=params.resource,
            subject=self._server.user.sub)
        self.codes[code.code] = code
        return construct_redirect_uri(str(params.redirect_uri), code=code.code, state=params.state)

    async def load_authorization_code(self, client: OAuthClientInformationFull,
                                      authorization_code: str) -> AuthorizationCode | None:
        code = self.codes.get(authorization_code)
        return code if code is not None and code.client_id == client.client_id else None

    async def exchange_authorization_code(self, client: OAuthClientInformationFull,
                                          authorization_code: AuthorizationCode) -> OAuthToken:
        del self.codes[authorization_code.code]
        return self._tokens(authorization_code.client_id, authorization_code.scopes, authorization_code.resource,
                            authorization_code.subject)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> RefreshToken | None:
        token = self.refresh_tokens.get(refresh_token)
        return token if token is not None and token.client_id == client.client_id else None

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: RefreshToken,
                                     scopes: list[str]) -> OAuthToken:
        del self.refresh_tokens[refresh_token.token]
        return self._tokens(refresh_token.client_id, scopes, refresh_token.resource, refresh_token.subject)

    async def load_access_token(self, token: str) -> AccessToken | None:
        return None  # this server's tokens are checked by resource servers with its JWKS

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.refresh_tokens.pop(token.token, None)

    def _tokens(self, client_id: str, scopes: list[str], resource: str | None, subject: str | None) -> OAuthToken:
        if resource is None:
            raise TokenError("invalid_target", "a resource indicator (RFC 8707) is required")
        access = self._server.mint(subject or self._server.user.sub, audience=resource,
                                   claims={"client_id": client_id, "scope": " ".join(scopes)})
        refresh = RefreshToken(token=secrets.token_urlsafe(32), client_id=client_id, scopes=scopes,
                               resource=resource, subject=subject)
        self.refresh_tokens[refresh.token] = refresh
        self._server.tokens_issued += 1
        return OAuthToken(access_token=access, token_type="Bearer", expires_in=ACCESS_TOKEN_SECONDS,
                          refresh_token=refresh.token, scope=" ".join(scopes) or None)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without taking over the test process's signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AuthorizationServer:
    """A real OAuth 2.1 authorization server on loopback (see the module docstring).

    ``path`` gives the issuer a path (``http://127.0.0.1:PORT/tenant``) and ``discovery`` says
    where its metadata is published: ``"oauth"`` (RFC 8414 3.1, the well-known suffix before the
    issuer's path) or ``"openid"`` (OpenID Connect Discovery 4, appended to the issuer) only. The
    sign-in endpoints stay at the root, so a client's sign-in works with the defaults only."""

    def __init__(self, *, path: str = "", discovery: str = "oauth") -> None:
        self.keys: list[RsaKey] = [RsaKey.generate()]   # the first signs; all are published
        self.user = User()
        self.jwks_fetches = 0
        # >1: the key set is sent chunked, in this many pieces 50 ms apart (as a large key set
        # with certificate chains arrives over several reads).
        self.jwks_pieces = 1
        self.metadata_fetches = 0
        self.tokens_issued = 0     # by the token endpoint
        self.provider = _Provider(self)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self.port = int(self._socket.getsockname()[1])
        self.origin = f"http://{LOOPBACK}:{self.port}"
        self.issuer = self.origin + path
        self._path = path
        self._discovery = discovery
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def jwks_uri(self) -> str:
        return self.origin + "/jwks"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk for key in self.keys]}

    def rotate(self, *, keep_old: bool = True) -> RsaKey:
        """Sign with a new key from now on; the old ones stay published unless ``keep_old`` is False."""
        key = RsaKey.generate()
        self.keys = [key, *self.keys] if keep_old else [key]
        return key

    def mint(self, sub: str = "alice", *, audience: str | list[str], roles: list[str] | None = None,
             lifetime: float = ACCESS_TOKEN_SECONDS, claims: Mapping[str, Any] | None = None,
             header: Mapping[str, Any] | None = None, key: RsaKey | None = None, issuer: str | None = None) -> str:
        """A signed RFC 9068 access token; every part can be overridden (``claims`` values of None
        remove a claim)."""
        now = int(time.time())
        user = self.user if sub == self.user.sub else User(sub=sub, claims={})
        body: dict[str, Any] = {
            "iss": issuer or self.issuer, "sub": sub, "aud": audience, "iat": now, "nbf": now,
            "exp": now + int(lifetime), "jti": secrets.token_hex(8), "client_id": "test-client",
            "roles": user.roles if roles is None else roles, **user.claims}
        for name, value in (claims or {}).items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        signer = key or self.keys[0]
        headers = {"typ": "at+jwt", "kid": signer.kid, **(header or {})}
        return jwt.encode(body, signer.private, algorithm="RS256", headers=headers)

    def _app(self) -> Starlette:
        issuer = AnyHttpUrl(self.origin)
        registration = ClientRegistrationOptions(enabled=True)
        revocation = RevocationOptions(enabled=True)
        metadata = build_metadata(issuer, None, registration, revocation).model_dump(mode="json", exclude_none=True)
        # RFC 8414 2: exactly the issuer string (the URL type would add a "/"), plus jwks_uri.
        metadata.update(issuer=self.issuer, jwks_uri=self.jwks_uri)

        async def authorization_server_metadata(request: Request) -> Response:
            self.metadata_fetches += 1
            return JSONResponse(metadata)

        async def jwks(request: Request) -> Response:
            self.jwks_fetches += 1
            if self.jwks_pieces <= 1:
                return JSONResponse(self.jwks())
            body = json.dumps(self.jwks()).encode()
            size = len(body) // self.jwks_pieces + 1

            async def pieces() -> AsyncIterator[bytes]:
                for start in range(0, len(body), size):
                    yield body[start:start + size]
                    await asyncio.sleep(0.05)

            return StreamingResponse(pieces(), media_type="application/json")

        metadata_path = (f"/.well-known/oauth-authorization-server{self._path}" if self._discovery == "oauth"
                         else f"{self._path}/.well-known/openid-configuration")
        routes = [Route(metadata_path, authorization_server_metadata, methods=["GET"]),
                  Route("/jwks", jwks, methods=["GET"])]
        routes += [route for route in create_auth_routes(self.provider, issuer, None, registration, revocation)
                   if route.path != "/.well-known/oauth-authorization-server"]
        return Starlette(routes=routes)

    async def start(self) -> None:
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", http="h11", ws="none",
                                log_config=None, access_log=False, timeout_graceful_shutdown=1)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="authorization-server")
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                raise RuntimeError("the authorization server did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait({self._task}, timeout=5)
            if not done:
                self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._socket.close()


@asynccontextmanager
async def authorization_server() -> AsyncIterator[AuthorizationServer]:
    server = AuthorizationServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class UpstreamTokenVerifier:
    """The MCP SDK's ``TokenVerifier`` for an upstream that checks tokens itself: signature with
    the authorization server's keys, issuer and audience."""

    def __init__(self, server: AuthorizationServer, audience: str) -> None:
        self._server = server
        self._audience = audience
        self.verified: list[str] = []   # the subjects of the tokens it accepted

    async def verify_token(self, token: str) -> AccessToken | None:
        keys = {key.kid: key for key in self._server.keys}
        try:
            key = keys[jwt.get_unverified_header(token).get("kid", "")]
            claims = jwt.decode(token, key.private.public_key(), algorithms=["RS256"], audience=self._audience,
                                issuer=self._server.issuer)
        except (KeyError, jwt.InvalidTokenError):
            return None
        self.verified.append(claims["sub"])
        return AccessToken(token=token, client_id=claims.get("client_id", ""), scopes=[], expires_at=claims["exp"],
                           resource=self._audience, subject=claims["sub"], claims={"iss": claims["iss"]})


class MemoryTokenStorage:
    """The client's token and registration store (the SDK's ``TokenStorage``), in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class BrowserStandIn:
    """The user's browser in the authorization code flow: opens the authorization URL and hands
    the code from the redirect back to the client (its callback handler)."""

    def __init__(self) -> None:
        self.visits: list[str] = []
        self._result: AuthorizationCodeResult | None = None

    async def open(self, url: str) -> None:
        self.visits.append(url)
        async with httpx2.AsyncClient(trust_env=False, timeout=10) as http:
            response = await http.get(url)
        assert response.status_code == 302, response.text
        query = parse_qs(urlsplit(response.headers["location"]).query)
        assert "code" in query, response.headers["location"]
        self._result = AuthorizationCodeResult(code=query["code"][0], state=query.get("state", [None])[0],
                                               iss=query.get("iss", [None])[0])

    async def callback(self) -> AuthorizationCodeResult:
        assert self._result is not None, "the authorization URL was never opened"
        return self._result


@dataclass
class SignedInClient:
    """What :func:`signed_in_client` yields: the connected MCP client and the sign-in's traces."""

    client: Client
    storage: MemoryTokenStorage
    browser: BrowserStandIn
    wire: WireLog


@asynccontextmanager
async def signed_in_client(url: str, *, mode: str = "auto",
                           storage: MemoryTokenStorage | None = None) -> AsyncIterator[SignedInClient]:
    """The official MCP client for the endpoint ``url``, signing in with OAuth as an interactive
    MCP client does (redirect URI on loopback, RFC 8252 7.3)."""
    storage = storage or MemoryTokenStorage()
    browser = BrowserStandIn()
    wire = WireLog()
    provider = OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(client_name="toolio tests", redirect_uris=[AnyUrl("http://127.0.0.1:9/cb")],
                                            grant_types=["authorization_code", "refresh_token"]),
        storage=storage, redirect_handler=browser.open, callback_handler=browser.callback)
    async with (
        httpx2.AsyncClient(auth=provider, trust_env=False, timeout=httpx2.Timeout(30.0, read=300.0),
                           event_hooks={"request": [wire.on_request], "response": [wire.on_response]}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield SignedInClient(client, storage, browser, wire)
