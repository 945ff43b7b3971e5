"""Verify toolio-sidecar's X-Toolio-Assertion with PyJWT (docs/server-authors.md).

Copy this file into your MCP server; it needs only ``PyJWT[crypto]``. The tests run it against
a real sidecar (tests/deploy/test_docs_examples.py).

    verifier = AssertionVerifier("http://127.0.0.1:9090/.well-known/jwks.json")
    claims = verifier.verify(headers["x-toolio-assertion"], method="POST", path_qs="/mcp")
    claims["sub"], claims["name"], claims["perms"]   # key id, key name, permissions
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jwt

TYP = "toolio+jwt"
# Everything the sidecar puts in an assertion; a token without one of them is not its own.
REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "htm", "htu", "ws", "roles", "perms"]


class ReplayError(jwt.InvalidTokenError):
    """The assertion's ``jti`` was seen before: the header was copied from another request."""


class ReplayCache:
    """Remembers each ``jti`` until its assertion expires (RFC 7519 4.1.7: a jti is unique), so
    a copied header is refused even within its lifetime. One process's memory: with several
    server processes, use a shared store instead (e.g. Redis ``SET jti 1 NX EXAT exp``)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_remember(self, jti: str, expires_at: float) -> None:
        now = time.time()
        with self._lock:
            if len(self._seen) > 10_000:  # forget the expired ones now and then
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            if self._seen.get(jti, 0.0) > now:
                raise ReplayError(f"assertion {jti} was already used")
            self._seen[jti] = expires_at


class AssertionVerifier:
    """Checks signature (keys from the sidecar's JWKS, cached by ``kid``), ``typ``, issuer,
    audience, times (with ``leeway`` seconds of clock skew), the request it was made for
    (``htm`` / ``htu``) and, with a :class:`ReplayCache`, that it is used once."""

    def __init__(self, jwks_url: str, *, issuer: str = "toolio-sidecar", audience: str = "toolio-mcp",
                 leeway: float = 30.0, replay_cache: ReplayCache | None = None) -> None:
        # Keys are fetched once and again only for an unknown kid (a rotation), at most every
        # 30 s; the sidecar publishes a new key before it signs with it.
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._replays = replay_cache

    def verify(self, token: str, *, method: str, path_qs: str) -> dict[str, Any]:
        """The claims of a valid assertion for this request; ``jwt.InvalidTokenError`` otherwise.

        ``path_qs`` is the request target as your server received it: path and query, undecoded.
        PyJWKClient fetches keys with a blocking call; from async code, run this in a thread.
        """
        header = jwt.get_unverified_header(token)
        if header.get("typ") != TYP:  # explicit typing (RFC 8725 3.11): not some other JWT
            raise jwt.InvalidTokenError(f"typ must be {TYP}")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientError as exc:  # no key with this kid: not signed by this sidecar
            raise jwt.InvalidTokenError(str(exc)) from None
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["ES256", "EdDSA"], issuer=self._issuer, audience=self._audience,
            leeway=self._leeway, options={"require": REQUIRED_CLAIMS})
        # Bound to one request: a header lifted from a GET cannot authorise a POST elsewhere.
        if claims["htm"] != method:
            raise jwt.InvalidTokenError("the assertion was made for another method")
        if claims["htu"] != path_qs:
            raise jwt.InvalidTokenError("the assertion was made for another path")
        if self._replays is not None:
            self._replays.check_and_remember(claims["jti"], claims["exp"] + self._leeway)
        return claims
