"""Interactive users beside API keys: the OAuth resource server (docs/reference/config.md, [oauth]).

``oauth.mode`` decides what happens to a Bearer token that is not shaped like a key:

* ``off``: nothing here; it is refused like any bad key.
* ``pass-through``: it is the upstream's to check. :meth:`OAuthGate.cached` answers the one
  pass-through :class:`Principal` (no identity, nothing keyed by it).
* ``validate``: it must be a JWT access token (RFC 9068) from ``oauth.issuer``, verified here under
  RFC 8725's rules: only the asymmetric algorithms below (never ``none``, never an HMAC, so a
  public key can never be used as a shared secret), the key's ``alg`` and type must agree with the
  token's, ``typ`` when present is ``at+jwt`` (RFC 9068 2.1, RFC 8725 3.11), ``iss`` equals the
  issuer exactly, ``aud`` contains the audience, ``exp`` / ``nbf`` hold with a small leeway, and a
  ``crit`` header (an extension we cannot understand, RFC 7515 4.1.11) is refused. The user becomes
  a :class:`Principal` (``user:<sub>``) with the configured roles the token names.

Keys come from the issuer's JWKS (``oauth.jwks_uri``, else its RFC 8414 metadata, else its
OpenID Connect discovery document), fetched with aiohttp so the event loop never blocks, cached,
refreshed in the background every few minutes, and fetched again when a token names an unknown
``kid`` (key rotation) - at most once per :data:`UNKNOWN_KID_COOLDOWN_SECONDS` after the first, so a
stream of made-up ``kid`` values cannot turn the sidecar into a load generator against the
authorization server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cachetools import LRUCache

from sidecar.errors import InvalidToken, SignInUnavailable
from sidecar.gate.principal import Principal
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import Settings

# alg -> (kty, crv) of the keys that may verify it (RFC 7518 3.1, RFC 8037 3.1). No "none" and no
# HS*: the sidecar holds no secret shared with the authorization server.
ALGORITHMS: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}
# RFC 9068 2.1; media types compare case-insensitively (RFC 7515 4.1.9).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
LEEWAY_SECONDS = 30                  # clock skew allowed on exp / nbf / iat (RFC 7519 4.1.4)
JWKS_MAX_AGE_SECONDS = 300           # a key set older than this is refreshed in the background
# Between refetches caused by an unknown kid. Short: anyone can send a token with a made-up kid,
# and a rotated-in key must not wait long behind one; one fetch per 5 s spares the issuer.
UNKNOWN_KID_COOLDOWN_SECONDS = 5
FAILED_FETCH_COOLDOWN_SECONDS = 5    # after a failed fetch, before the next (the 503's Retry-After)
FETCH_TIMEOUT_SECONDS = 5
MAX_DOCUMENT_BYTES = 1024 * 1024
TOKEN_CACHE_SIZE = 10_000
METADATA_PATH = "/.well-known/oauth-protected-resource"   # RFC 9728 3
_NAME_CLAIMS = ("preferred_username", "email", "name")


class FetchError(Exception):
    """The authorization server's metadata or key set could not be had (logged, never shown)."""


def _header_safe(value: object, limit: int = 255) -> str | None:
    """``value`` if it can be an upstream header value as is: printable ASCII, no surrounding
    whitespace (the upstream would not read it back the same), at most ``limit`` characters."""
    if (isinstance(value, str) and 0 < len(value) <= limit and value.isascii() and value.isprintable()
            and value == value.strip() and not _LIST_SYNTAX.search(value)):
        return value
    return None


# A comma, semicolon or quote would make an upstream that reads the header as a list (RFC 9110
# 5.6.1) see two values: "user:x, key:key_ABC".
_LIST_SYNTAX = re.compile(r'[,;"]')


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name such as 127.attacker.example is not a loopback address
        return False


def _acceptable_url(url: object) -> bool:
    """A fetched URL (a metadata document's ``jwks_uri``) obeys the rule the config's do: https,
    plain http only on loopback."""
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname))


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata lives: RFC 8414 3.1 (the well-known suffix inserted before the
    issuer's path), then OpenID Connect Discovery 1.0 4 (appended to it)."""
    parts = urlsplit(issuer)
    origin = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    return [f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}{path}/.well-known/openid-configuration"]


def resource_metadata_url(resource: str) -> str:
    """RFC 9728 3.1: the well-known suffix inserted between the resource's host and its path."""
    parts = urlsplit(resource)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{METADATA_PATH}{path}"


class KeySet:
    """The issuer's signing keys by ``kid``, fetched and refreshed as the module docstring says."""

    def __init__(self, issuer: str, jwks_uri: str, log: JsonLog) -> None:
        self._issuer = issuer
        self._jwks_uri = jwks_uri            # "" until discovered
        self._log = log
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[str, dict[str, Any]] = {}   # kid ("" when absent) -> JWK
        self._verifiers: dict[tuple[str, str], Any] = {}  # (kid, alg) -> public key object
        self.fetched_at: float | None = None         # monotonic, of the last successful fetch
        self._last_forced = -float("inf")
        self._last_failure = -float("inf")
        self._flight: asyncio.Task[bool] | None = None
        self.generation = 0                          # bumped whenever the set of keys changes

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS), trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), headers={"Accept": "application/json"})

    async def close(self) -> None:
        if self._flight is not None:
            self._flight.cancel()
            with contextlib.suppress(BaseException):
                await self._flight
        if self._session is not None:
            await self._session.close()

    def refresh_soon(self) -> None:
        """Start a fetch in the background unless one is running (the set is getting old)."""
        if self._flight is None or self._flight.done():
            self._flight = asyncio.get_running_loop().create_task(self._fetch())

    def refresh_if_old(self) -> None:
        """An old key set is fetched again in the background while the keys in hand go on
        serving (and, should the issuer be unreachable, retried once per cooldown, not per
        request). This is how a key the issuer withdrew stops working."""
        now = time.monotonic()
        if (self.fetched_at is not None and now - self.fetched_at > JWKS_MAX_AGE_SECONDS
                and now - self._last_failure >= FAILED_FETCH_COOLDOWN_SECONDS):
            self.refresh_soon()

    async def refresh(self) -> bool:
        """Fetch now (sharing a fetch already running); True if the set was fetched."""
        self.refresh_soon()
        assert self._flight is not None
        return await asyncio.shield(self._flight)

    async def key_for(self, kid: str, algorithm: str) -> Any:
        """The public key that may verify a token of ``algorithm`` signed with ``kid``; None if
        there is none. Raises :class:`SignInUnavailable` when no key set could ever be fetched."""
        if self.fetched_at is None:
            # Never fetched: try (at most once per cooldown, so a crowd of users cannot hammer an
            # authorization server that is down); without keys no token can be checked.
            if time.monotonic() - self._last_failure >= FAILED_FETCH_COOLDOWN_SECONDS:
                await self.refresh()
            if self.fetched_at is None:
                raise SignInUnavailable()
        else:
            self.refresh_if_old()
        if kid not in self._keys and not (kid == "" and len(self._keys) == 1):
            # Perhaps the issuer rotated its keys since the last fetch (RFC 7517 4.5). Once per
            # cooldown: the first unknown kid after a fetch always gets its refetch.
            now = time.monotonic()
            if now - self._last_forced < UNKNOWN_KID_COOLDOWN_SECONDS:
                return None
            self._last_forced = now
            await self.refresh()
        jwk = self._keys.get(kid)
        if jwk is None and kid == "" and len(self._keys) == 1:
            # RFC 7515 4.1.4: kid is optional; with a single key there is no doubt which one.
            jwk = next(iter(self._keys.values()))
        if jwk is None:
            return None
        kty, crv = ALGORITHMS[algorithm]
        # RFC 8725 3.1 / RFC 7517 4.4: the key is used only with the algorithm it is meant for.
        if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
            return None
        if jwk.get("alg") not in (None, algorithm):
            return None
        cached = (kid, algorithm)
        verifier = self._verifiers.get(cached)
        if verifier is None:
            try:
                verifier = jwt.PyJWK(jwk, algorithm=algorithm).key
            except jwt.PyJWTError:
                return None
            self._verifiers[cached] = verifier
        return verifier

    async def _fetch(self) -> bool:
        try:
            if not self._jwks_uri:
                self._jwks_uri = await self._discover()
            document = await self._get_json(self._jwks_uri)
            keys = self._usable(document)
        except Exception as exc:  # FetchError, or anything unforeseen in a document we do not control
            self._log.warning("oauth: cannot fetch the authorization server's keys", issuer=self._issuer,
                              error=str(exc) if isinstance(exc, FetchError) else repr(exc))
            self._last_failure = time.monotonic()
            return False
        if keys != self._keys:
            self._keys = keys
            self._verifiers = {}
            self.generation += 1
            self._log.info("oauth: signing keys loaded", issuer=self._issuer, kids=sorted(keys))
        self.fetched_at = time.monotonic()
        return True

    @staticmethod
    def _usable(document: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise FetchError("the JWKS is not a JSON object with a keys list (RFC 7517 5)")
        keys: dict[str, dict[str, Any]] = {}
        kinds = {kty for kty, _ in ALGORITHMS.values()}
        for jwk in document["keys"]:
            # Signature keys of the kinds above only: an encryption key or a symmetric ("oct")
            # key is never a verification key here.
            if (not isinstance(jwk, dict) or jwk.get("kty") not in kinds or jwk.get("use", "sig") != "sig"
                    or "d" in jwk):
                continue
            kid = jwk.get("kid", "")
            if isinstance(kid, str):
                keys.setdefault(kid, jwk)
        if not keys:
            raise FetchError("the JWKS holds no usable signature key")
        return keys

    async def _discover(self) -> str:
        """The issuer's ``jwks_uri`` from its metadata, whose ``issuer`` must be the configured one
        exactly (RFC 8414 3.3, OpenID Connect Discovery 4.3): else another server's keys could be used."""
        failures = []
        for url in metadata_urls(self._issuer):
            try:
                metadata = await self._get_json(url)
            except FetchError as exc:
                failures.append(str(exc))
                continue
            if not isinstance(metadata, dict) or metadata.get("issuer") != self._issuer:
                raise FetchError(f"{url}: the metadata's issuer is not {self._issuer}")
            jwks_uri = metadata.get("jwks_uri")
            if not _acceptable_url(jwks_uri):
                raise FetchError(f"{url}: no https jwks_uri in the metadata")
            assert isinstance(jwks_uri, str)
            return jwks_uri
        raise FetchError("; ".join(failures))

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        try:
            # Redirects are not followed: the configured issuer's own URLs are the trusted ones.
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise FetchError(f"{url}: HTTP {response.status}")
                if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
                # The whole body, however many reads it arrives in (a chunked answer, a key set
                # with certificate chains spanning several TLS records), within the bound.
                body = bytearray()
                async for piece in response.content.iter_any():
                    body += piece
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise FetchError(f"{url}: {type(exc).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError(f"{url}: not JSON") from None


class OAuthGate:
    """What the authenticator asks about a Bearer token that is not a key's, and what the public
    listener serves about this resource (RFC 9728)."""

    def __init__(self, settings: Settings, metrics: Metrics, log: JsonLog) -> None:
        oauth = settings.oauth
        self.mode = oauth.mode
        self._settings = settings
        self._metrics = metrics
        self._issuer = oauth.issuer
        self._audience = oauth.required_audience
        self._roles_claim = oauth.roles_claim
        self.passthrough = Principal.passthrough(settings) if self.mode == "pass-through" else None
        self._keys: KeySet | None = None
        # sha256(token) -> (principal, exp): a verified token costs a dict lookup until it expires.
        self._verified: LRUCache[bytes, tuple[Principal, float]] = LRUCache(TOKEN_CACHE_SIZE)
        self._verified_generation = 0
        self.resource_metadata_url: str | None = None
        self.metadata_paths: frozenset[str] = frozenset()
        self.metadata_body = b""
        if self.mode != "off" and oauth.resource:
            # pass-through: the upstream serves the metadata at this URL (the discovery paths are
            # forwarded), so the sidecar's own 401s can point MCP clients at it too.
            self.resource_metadata_url = resource_metadata_url(oauth.resource)
        if self.mode == "validate":
            self._keys = KeySet(oauth.issuer, oauth.jwks_uri, log)
            assert self.resource_metadata_url is not None
            # RFC 9728 3.1 names the path-suffixed URL; clients also try the bare one (MCP
            # authorization, Protected Resource Metadata Discovery): both answer.
            self.metadata_paths = frozenset({METADATA_PATH, urlsplit(self.resource_metadata_url).path})
            self.metadata_body = json.dumps({
                "resource": oauth.resource,
                "authorization_servers": [oauth.issuer],
                "bearer_methods_supported": ["header"],
            }).encode()

    async def open(self) -> None:
        if self._keys is not None:
            await self._keys.open()
            # Fetched at start so the first user does not wait for it; a failure is only logged
            # (the authorization server may come up later) and retried on the first token.
            self._keys.refresh_soon()

    async def close(self) -> None:
        if self._keys is not None:
            await self._keys.close()

    def cached(self, token: str) -> Principal | None:
        """The caller for ``token`` without any work: the pass-through principal, or a user whose
        token was verified before and has not expired."""
        if self.passthrough is not None:
            return self.passthrough
        if self._keys is not None:
            self._keys.refresh_if_old()
        self._forget_if_keys_changed()
        hit = self._verified.get(hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest())
        if hit is not None and time.time() < hit[1]:
            return hit[0]
        return None

    def _forget_if_keys_changed(self) -> None:
        if self._keys is not None and self._keys.generation != self._verified_generation:
            # The issuer's key set changed (a key withdrawn): verify every token afresh.
            self._verified.clear()
            self._verified_generation = self._keys.generation

    async def verify(self, token: str) -> Principal:
        """Verify an access token (``validate`` mode); raises :class:`InvalidToken` with a bounded
        reason (docs/reference/metrics.md) or :class:`SignInUnavailable`."""
        assert self._keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("token_invalid", "The access token is not a JWT") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise InvalidToken("token_invalid", "The access token's algorithm is not accepted")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES):
            raise InvalidToken("token_invalid", "The token is not an access token (typ)")
        if "crit" in header:
            raise InvalidToken("token_invalid", "The access token uses an unsupported extension (crit)")
        kid = header.get("kid", "")
        if not isinstance(kid, str):
            raise InvalidToken("token_invalid", "The access token's kid is not a string")
        try:
            key = await self._keys.key_for(kid, algorithm)
        except SignInUnavailable:
            self._metrics.count_auth_failure("token_keys_unavailable")
            raise
        if key is None:
            raise InvalidToken("token_invalid", "The access token was not signed by a known key")
        generation = self._keys.generation
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[algorithm], audience=self._audience, issuer=self._issuer,
                leeway=LEEWAY_SECONDS, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token_expired", "The access token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token_audience", "The access token is for another resource") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token_issuer", "The access token is from another issuer") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("token_invalid", "The access token is invalid") from None
        principal = self._principal(claims)
        self._forget_if_keys_changed()
        if generation == self._verified_generation:
            # Remembered only under the key set it was checked against.
            self._verified[hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()] = (
                principal, float(claims["exp"]))
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        sub = _header_safe(claims.get("sub"))
        if sub is None:
            raise InvalidToken("token_invalid", "The access token's subject cannot be used")
        name = next((n for n in (_header_safe(claims.get(c)) for c in _NAME_CLAIMS) if n is not None), sub)
        configured = self._settings.roles
        roles = [role for role in self._claimed_roles(claims) if role in configured]
        try:
            return Principal.for_user(sub, name, roles, self._settings)
        except ValueError:
            raise InvalidToken("token_invalid", "The access token's subject cannot be used") from None

    def _claimed_roles(self, claims: Mapping[str, Any]) -> list[str]:
        """The roles claim: a list of names or one space-separated string (as ``scope`` is, RFC
        9068 2.2.3), found by its exact name or, failing that, as a dotted path into nested objects
        (``realm_access.roles``)."""
        value: Any = claims.get(self._roles_claim)
        if value is None and "." in self._roles_claim:
            value = claims
            for part in self._roles_claim.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [item for item in value if isinstance(item, str)]
        return []
