"""Interactive users beside keys (docs/reference/config.md, [oauth]; docs/operations.md, Users who
sign in): the sidecar as the OAuth resource server in ``validate`` mode, against a real
authorization server (tests.support.oauth), and the ``pass-through`` and ``off`` modes; keys work
the same in every mode."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict

from sidecar.assertion import verify
from sidecar.gate import oauth
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.metrics import sample
from tests.support.oauth import AuthorizationServer, RsaKey, authorization_server
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, free_port, raw_request
from tests.support.upstreams import RecordingUpstream

METADATA = "/.well-known/oauth-protected-resource"


@pytest.fixture
async def issuer() -> Any:
    async with authorization_server() as server:
        yield server


def _oauth_settings(config: ConfigFactory, upstream: str, mode: str, server: AuthorizationServer | None = None,
                    **oauth: Any) -> Any:
    """Settings for a sidecar on a known port (``oauth.resource`` names it) in front of ``upstream``."""
    port = free_port()
    section: dict[str, Any] = {"mode": mode, **oauth}
    if mode == "validate":
        assert server is not None
        section.setdefault("issuer", server.issuer)
        section.setdefault("resource", f"http://{LOOPBACK}:{port}/mcp")
    return config.settings({"proxy": {"upstream": upstream, "listen": f"{LOOPBACK}:{port}"}, "oauth": section})


@pytest.fixture
async def validating(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
                     issuer: AuthorizationServer) -> RunningSidecar:
    return await start_sidecar(_oauth_settings(config, echo.url, "validate", issuer))


@pytest.fixture
async def passing(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> RunningSidecar:
    return await start_sidecar(_oauth_settings(config, echo.url, "pass-through"))


def _resource(sidecar: RunningSidecar) -> str:
    return sidecar.settings.oauth.resource


async def _send(sidecar: RunningSidecar, path: str = "/mcp", headers: Any = None,
                method: str = "GET") -> tuple[int, CIMultiDict[str], str]:
    async with client_session() as http, http.request(method, sidecar.proxy_url + path, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.text()


def _seen(text: str) -> dict[str, str]:
    """The echo upstream's view of the request's headers (the last value of each name)."""
    return {name.lower(): value for name, value in json.loads(text)["headers"]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A JWS with an empty signature (RFC 7519 6: an "unsecured" JWT)."""
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


# -- validate: a user's token -------------------------------------------------------------------


async def test_a_users_token_reaches_the_upstream_as_a_signed_identity_without_the_token(
        validating: RunningSidecar, issuer: AuthorizationServer, echo: RecordingUpstream) -> None:
    token = issuer.mint(audience=_resource(validating), roles=["writer", "viewer", "no-such-role"])
    spoofed = {"X-Toolio-Subject": "user:mallory", "X-Toolio-Key-Id": "key_spoofed"}
    status, _, text = await _send(validating, headers={**bearer(token), **spoofed})
    assert status == 200, text
    seen = _seen(text)
    assert "authorization" not in seen
    assert seen["x-toolio-subject"] == "user:alice"
    assert seen["x-toolio-key-id"] == "user:alice"
    assert seen["x-toolio-key-name"] == "alice@example.com"
    assert seen["x-toolio-workspace"] == "acme"
    assert seen["x-toolio-roles"] == "viewer,writer"      # configured roles only, sorted
    assert seen["x-toolio-permissions"] == "plans:read,plans:write"
    request = echo.requests[-1]
    assert len(request.all("X-Toolio-Subject")) == 1
    claims = verify(request.one("X-Toolio-Assertion"), jwks=validating.services.signer.jwks,  # type: ignore[union-attr]
                    method="GET", path="/mcp")
    assert claims["sub"] == "user:alice"
    assert claims["subject"] == "user:alice"
    assert claims["roles"] == ["viewer", "writer"]


async def test_a_verified_token_is_not_verified_again_and_the_access_log_names_the_user(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    token = issuer.mint(audience=_resource(validating))
    for _ in range(3):
        assert (await _send(validating, headers=bearer(token)))[0] == 200
    assert issuer.jwks_fetches == 1
    access = [line for line in validating.log_lines() if line["type"] == "access"]
    assert [(line["kind"], line["key_id"], line["status"]) for line in access] == [("user", "user:alice", 200)] * 3
    registry = validating.services.registry
    assert sample(registry, "toolio_sidecar_requests_by_kind_total", kind="user", status_class="2xx") == 3
    assert sample(registry, "toolio_sidecar_requests_by_kind_total", kind="key", status_class="2xx") == 0


async def test_a_user_without_configured_roles_gets_no_roles_and_a_string_roles_claim_is_split(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    resource = _resource(validating)
    _, _, text = await _send(validating, headers=bearer(issuer.mint("bob", audience=resource, roles=["root"])))
    seen = _seen(text)
    assert (seen["x-toolio-subject"], seen["x-toolio-key-name"], seen["x-toolio-roles"]) == ("user:bob", "bob", "")
    token = issuer.mint("carol", audience=[resource, "other"], claims={"roles": "writer viewer"})
    assert _seen((await _send(validating, headers=bearer(token)))[2])["x-toolio-roles"] == "viewer,writer"


async def test_keys_work_beside_users_in_validate_mode(validating: RunningSidecar) -> None:
    record, key = await validating.create_key("agent", ["viewer"])
    status, _, text = await _send(validating, headers=bearer(key))
    assert status == 200
    seen = _seen(text)
    assert (seen["x-toolio-key-id"], seen["x-toolio-subject"]) == (record.id, f"key:{record.id}")
    assert "authorization" not in seen
    assert [line["kind"] for line in validating.log_lines() if line["type"] == "access"] == ["key"]


# -- validate: refusals -------------------------------------------------------------------------


def _forged(issuer: AuthorizationServer, resource: str, case: str) -> str:
    if case == "expired":
        return issuer.mint(audience=resource, lifetime=-120)
    if case == "not yet valid":
        return issuer.mint(audience=resource, claims={"nbf": 4102444800})
    if case == "wrong audience":
        return issuer.mint(audience="https://other.example/mcp")
    if case == "wrong issuer":
        return issuer.mint(audience=resource, issuer="https://evil.example")
    if case == "alg none":
        return _unsigned({"iss": issuer.issuer, "sub": "alice", "aud": resource, "exp": 4102444800},
                         {"alg": "none", "typ": "at+jwt", "kid": issuer.keys[0].kid})
    if case == "HS256 keyed with the public key":
        # RFC 8725 2.1: the RSA public key (known to all) used as an HMAC secret.
        public = issuer.keys[0].private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = _unsigned({"iss": issuer.issuer, "sub": "alice", "aud": resource, "exp": 4102444800},
                                  {"alg": "HS256", "typ": "at+jwt", "kid": issuer.keys[0].kid})[:-1]
        return f"{signing_input}.{_b64(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())}"
    if case == "signed by an unknown key":
        return issuer.mint(audience=resource, key=RsaKey.generate())
    if case == "an id token (typ JWT)":
        return issuer.mint(audience=resource, header={"typ": "JWT"})
    if case == "critical extension":
        return issuer.mint(audience=resource, header={"crit": ["exp"]})
    if case == "no subject":
        return issuer.mint(audience=resource, claims={"sub": None})
    if case == "tampered claims":
        header, _, rest = issuer.mint(audience=resource).partition(".")
        _, _, signature = rest.partition(".")
        claims = {"iss": issuer.issuer, "sub": "admin", "aud": resource, "exp": 4102444800, "roles": ["org-admin"]}
        return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    if case == "not a JWT":
        return "opaque-access-token-0123456789"
    raise AssertionError(case)


REFUSALS = {
    "expired": "token_expired", "not yet valid": "token_invalid", "wrong audience": "token_audience",
    "wrong issuer": "token_issuer", "alg none": "token_invalid", "HS256 keyed with the public key": "token_invalid",
    "signed by an unknown key": "token_invalid", "an id token (typ JWT)": "token_invalid",
    "critical extension": "token_invalid", "no subject": "token_invalid", "tampered claims": "token_invalid",
    "not a JWT": "token_invalid",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_bad_token_is_refused_with_a_challenge_naming_the_resource_metadata(
        validating: RunningSidecar, issuer: AuthorizationServer, echo: RecordingUpstream, case: str) -> None:
    resource = _resource(validating)
    token = _forged(issuer, resource, case)
    status, headers, text = await _send(validating, headers=bearer(token))
    assert status == 401, text
    assert json.loads(text)["error"] == "invalid_token"
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="toolio", error="invalid_token", ')
    assert challenge.endswith(f', resource_metadata="http://{LOOPBACK}:{validating.proxy_port}{METADATA}/mcp"')
    assert token not in challenge and token not in text
    assert echo.requests == []
    registry = validating.services.registry
    assert sample(registry, "toolio_sidecar_auth_failures_total", reason=REFUSALS[case]) == 1


async def test_every_401_names_the_resource_metadata_and_keys_keep_their_errors(
        validating: RunningSidecar) -> None:
    status, headers, _ = await _send(validating)
    assert status == 401
    metadata = f"http://{LOOPBACK}:{validating.proxy_port}{METADATA}/mcp"
    assert headers.getall("WWW-Authenticate") == [f'Bearer realm="toolio", resource_metadata="{metadata}"']
    status, headers, text = await _send(validating, headers=bearer("tak_" + "A" * 46))
    assert (status, json.loads(text)["error"]) == (401, "invalid_token")
    assert headers["WWW-Authenticate"].endswith(f'resource_metadata="{metadata}"')
    # A 400 is not a challenge to sign in (RFC 6750 3.1): unchanged.
    status, headers, _ = await _send(validating, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 400
    assert "resource_metadata" not in headers["WWW-Authenticate"]


async def test_a_key_shaped_token_is_never_read_as_an_access_token(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    token = "TAK_" + issuer.mint(audience=_resource(validating))
    status, _, _ = await _send(validating, headers=bearer(token))
    assert status == 401
    assert sample(validating.services.registry, "toolio_sidecar_auth_failures_total", reason="invalid") == 1


# -- validate: the issuer's keys ----------------------------------------------------------------


async def test_a_rotated_signing_key_is_fetched_and_a_withdrawn_one_stops_working(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    resource = _resource(validating)
    old = issuer.mint(audience=resource)
    assert (await _send(validating, headers=bearer(old)))[0] == 200
    fetches = issuer.jwks_fetches
    issuer.rotate(keep_old=False)
    new = issuer.mint(audience=resource)
    assert (await _send(validating, headers=bearer(new)))[0] == 200
    assert issuer.jwks_fetches == fetches + 1
    # The old key left the set: its token, verified and remembered before, is checked afresh.
    assert (await _send(validating, headers=bearer(old)))[0] == 401


async def test_a_withdrawn_key_stops_working_once_the_key_set_is_refreshed(
        validating: RunningSidecar, issuer: AuthorizationServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The refresh period (5 minutes) made zero, so every request finds the key set old.
    monkeypatch.setattr(oauth, "JWKS_MAX_AGE_SECONDS", 0)
    token = issuer.mint(audience=_resource(validating))
    assert (await _send(validating, headers=bearer(token)))[0] == 200
    fetches = issuer.jwks_fetches
    issuer.rotate(keep_old=False)

    async def refused() -> bool:
        return (await _send(validating, headers=bearer(token)))[0] == 401

    await eventually(refused, what="the withdrawn key's token refused")
    assert issuer.jwks_fetches > fetches


async def test_unknown_key_ids_cause_at_most_one_refetch(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    resource = _resource(validating)
    assert (await _send(validating, headers=bearer(issuer.mint(audience=resource))))[0] == 200
    fetches = issuer.jwks_fetches
    for _ in range(5):
        stranger = issuer.mint(audience=resource, key=RsaKey.generate())
        assert (await _send(validating, headers=bearer(stranger)))[0] == 401
    assert issuer.jwks_fetches == fetches + 1


async def test_a_configured_jwks_uri_is_used_without_discovery(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        issuer: AuthorizationServer) -> None:
    sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", issuer, jwks_uri=issuer.jwks_uri))
    assert (await _send(sidecar, headers=bearer(issuer.mint(audience=_resource(sidecar)))))[0] == 200
    assert issuer.metadata_fetches == 0


@pytest.mark.parametrize(("path", "discovery"), [("", "openid"), ("/tenant", "oauth"), ("/tenant", "openid")])
async def test_the_keys_are_found_through_either_kind_of_issuer_metadata(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream, path: str,
        discovery: str) -> None:
    # RFC 8414 3.1 inserts the well-known suffix before the issuer's path; OpenID Connect
    # Discovery appends it to the issuer. Either one is found.
    server = AuthorizationServer(path=path, discovery=discovery)
    await server.start()
    try:
        sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", server))
        assert (await _send(sidecar, headers=bearer(server.mint(audience=_resource(sidecar)))))[0] == 200
        assert (server.metadata_fetches, server.jwks_fetches) == (1, 1)
    finally:
        await server.stop()


async def test_refused_tokens_spend_the_address_budget_but_a_verified_user_keeps_working(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        issuer: AuthorizationServer) -> None:
    settings = _oauth_settings(config, echo.url, "validate", issuer)
    settings = dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, failures_per_minute_per_address=3))
    sidecar = await start_sidecar(settings)
    resource = _resource(sidecar)
    good = issuer.mint(audience=resource)
    assert (await _send(sidecar, headers=bearer(good)))[0] == 200
    for _ in range(3):
        assert (await _send(sidecar, headers=bearer(issuer.mint(audience=resource, lifetime=-120))))[0] == 401
    status, headers, _ = await _send(sidecar, headers=bearer(issuer.mint("bob", audience=resource)))
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert (await _send(sidecar, headers=bearer(good)))[0] == 200


async def test_an_audience_other_than_the_resource_can_be_required(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        issuer: AuthorizationServer) -> None:
    sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", issuer, audience="api://toolio"))
    assert (await _send(sidecar, headers=bearer(issuer.mint(audience="api://toolio"))))[0] == 200
    assert (await _send(sidecar, headers=bearer(issuer.mint(audience=_resource(sidecar)))))[0] == 401


async def test_metadata_naming_another_issuer_is_not_trusted(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        issuer: AuthorizationServer) -> None:
    # The configured issuer differs from the one the metadata names (a trailing "/"): RFC 8414 3.3.
    sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", issuer, issuer=issuer.issuer + "/"))
    token = issuer.mint(audience=_resource(sidecar), issuer=issuer.issuer + "/")
    status, headers, text = await _send(sidecar, headers=bearer(token))
    assert (status, json.loads(text)["error"]) == (503, "temporarily_unavailable")
    assert headers["Retry-After"] == "5"
    assert issuer.jwks_fetches == 0


async def test_no_reachable_authorization_server_is_a_503_never_a_pass(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    gone = AuthorizationServer()   # never started: nothing answers at its issuer
    try:
        sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", gone))
        token = gone.mint(audience=_resource(sidecar))
        for _ in range(2):
            status, headers, text = await _send(sidecar, headers=bearer(token))
            assert (status, json.loads(text)["error"]) == (503, "temporarily_unavailable")
            assert headers["Retry-After"] == "5"
        assert echo.requests == []
        assert sample(sidecar.services.registry, "toolio_sidecar_auth_failures_total",
                      reason="token_keys_unavailable") == 2
        _, key = await sidecar.create_key()
        assert (await _send(sidecar, headers=bearer(key)))[0] == 200   # keys do not depend on it
    finally:
        await gone.stop()


# -- validate: protected resource metadata (RFC 9728) -------------------------------------------


@pytest.mark.parametrize("path", [METADATA, METADATA + "/mcp"])
async def test_the_protected_resource_metadata_is_served_without_auth(
        validating: RunningSidecar, issuer: AuthorizationServer, echo: RecordingUpstream, path: str) -> None:
    status, headers, text = await _send(validating, path)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert json.loads(text) == {"resource": _resource(validating), "authorization_servers": [issuer.issuer],
                                "bearer_methods_supported": ["header"]}
    assert (await _send(validating, path, method="OPTIONS"))[0] == 204
    assert (await _send(validating, path, method="POST"))[0] == 405
    assert echo.requests == []


@pytest.mark.parametrize("path", [METADATA + "/other", "/.well-known/oauth-authorization-server",
                                  "/.well-known/openid-configuration", "/.well-known/openid-configuration/mcp"])
async def test_other_discovery_paths_are_a_json_404_in_validate_mode(
        validating: RunningSidecar, echo: RecordingUpstream, path: str) -> None:
    status, _, text = await _send(validating, path)
    assert (status, json.loads(text)["error"]) == (404, "not_found")
    assert echo.requests == []


# -- sessions -----------------------------------------------------------------------------------


async def test_a_users_session_is_not_a_keys_and_not_another_users(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    resource = _resource(validating)
    alice = issuer.mint(audience=resource)
    assert (await _send(validating, "/mcp?session=s-alice", headers=bearer(alice)))[0] == 200
    session = {"Mcp-Session-Id": "s-alice"}
    assert (await _send(validating, headers={**bearer(alice), **session}))[0] == 200
    _, key = await validating.create_key()
    assert (await _send(validating, headers={**bearer(key), **session}))[0] == 403
    bob = issuer.mint("bob", audience=resource)
    assert (await _send(validating, headers={**bearer(bob), **session}))[0] == 403


# -- pass-through -------------------------------------------------------------------------------


async def test_pass_through_forwards_a_non_key_token_unchanged_and_adds_no_identity(
        passing: RunningSidecar, echo: RecordingUpstream) -> None:
    spoofed = {"X-Toolio-Key-Id": "key_spoofed", "X-Toolio-Subject": "user:mallory", "X_Toolio_Roles": "org-admin"}
    status, _, _ = await _send(passing, headers={"Authorization": "Bearer upstream-token.abc", **spoofed})
    assert status == 200
    request = echo.requests[-1]
    assert request.all("Authorization") == ["Bearer upstream-token.abc"]
    assert [name for name, _ in request.headers if name.lower().startswith(("x-toolio", "x_toolio"))] == []
    assert request.one("X-Forwarded-For") == "127.0.0.1"
    access = [line for line in passing.log_lines() if line["type"] == "access"]
    assert [(line["kind"], line["key_id"]) for line in access] == [("passthrough", None)]
    assert sample(passing.services.registry, "toolio_sidecar_requests_by_kind_total", kind="passthrough",
                  status_class="2xx") == 1


async def test_pass_through_keys_work_exactly_as_before(passing: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await passing.create_key("agent", ["viewer"])
    status, _, text = await _send(passing, headers=bearer(key))
    assert status == 200
    seen = _seen(text)
    assert "authorization" not in seen
    assert (seen["x-toolio-key-id"], seen["x-toolio-subject"]) == (record.id, f"key:{record.id}")
    # A mangled key is a bad key, never passed on as somebody else's token.
    status, _, _ = await _send(passing, headers=bearer(key[:-1] + ("A" if key[-1] != "A" else "B")))
    assert status == 401
    status, _, _ = await _send(passing, headers=bearer("tak_short"))
    assert status == 401
    assert len(echo.requests) == 1


async def test_pass_through_still_refuses_a_request_without_credentials(
        passing: RunningSidecar, echo: RecordingUpstream) -> None:
    status, headers, _ = await _send(passing)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="toolio"'
    assert echo.requests == []


@pytest.mark.parametrize("path", [METADATA, METADATA + "/mcp", "/.well-known/oauth-authorization-server",
                                  "/.well-known/openid-configuration"])
async def test_pass_through_forwards_discovery_without_credentials_or_identity(
        passing: RunningSidecar, echo: RecordingUpstream, path: str) -> None:
    _, key = await passing.create_key()
    status, _, _ = await _send(passing, path, headers=bearer(key))
    assert status == 200
    request = echo.requests[-1]
    assert request.path_qs == path
    assert request.all("Authorization") == []     # a key never reaches the upstream
    assert [name for name, _ in request.headers if name.lower().startswith("x-toolio")] == []
    assert (await _send(passing, path, method="POST"))[0] == 405
    assert len(echo.requests) == 1


async def test_pass_through_sessions_and_key_sessions_stay_apart(
        passing: RunningSidecar, echo: RecordingUpstream) -> None:
    token = {"Authorization": "Bearer upstream-token"}
    assert (await _send(passing, "/mcp?session=s-user", headers=token))[0] == 200
    _, key = await passing.create_key()
    assert (await _send(passing, "/mcp?session=s-key", headers=bearer(key)))[0] == 200
    assert (await _send(passing, headers={**bearer(key), "Mcp-Session-Id": "s-user"}))[0] == 403
    assert (await _send(passing, headers={**token, "Mcp-Session-Id": "s-key"}))[0] == 403
    assert (await _send(passing, headers={**token, "Mcp-Session-Id": "s-user"}))[0] == 200


async def test_pass_through_401s_point_at_the_metadata_when_the_resource_is_configured(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(_oauth_settings(config, echo.url, "pass-through",
                                                  resource="https://acme.toolio.example/mcp"))
    _, headers, _ = await _send(sidecar)
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="toolio", resource_metadata="https://acme.toolio.example/.well-known/oauth-protected-resource/mcp"')


# -- off ----------------------------------------------------------------------------------------


async def test_off_accepts_only_keys_and_answers_discovery_with_404(
        sidecar: RunningSidecar, echo: RecordingUpstream, issuer: AuthorizationServer) -> None:
    assert sidecar.settings.oauth.mode == "off"
    token = issuer.mint(audience="http://127.0.0.1/mcp")
    status, headers, _ = await _send(sidecar, headers=bearer(token))
    assert status == 401
    assert "resource_metadata" not in headers["WWW-Authenticate"]
    for path in (METADATA, METADATA + "/mcp", "/.well-known/oauth-authorization-server"):
        status, _, text = await _send(sidecar, path)
        assert (status, json.loads(text)["error"]) == (404, "not_found")
    assert echo.requests == []
    assert issuer.jwks_fetches == 0
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"


# -- found by an attack review ---------------------------------------------------------------------


async def test_a_key_set_that_arrives_in_several_reads_is_read_whole(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        issuer: AuthorizationServer) -> None:
    issuer.jwks_pieces = 4
    sidecar = await start_sidecar(_oauth_settings(config, echo.url, "validate", issuer))
    token = issuer.mint("alice", audience=_resource(sidecar))
    status, _, _ = await _send(sidecar, headers={"Authorization": f"Bearer {token}"})
    assert status == 200


@pytest.mark.parametrize("target", [
    METADATA + "/../../internal/admin",
    METADATA + "/%2e%2e/%2E%2E/internal",
    METADATA + "/..%2finternal",
    METADATA + "//internal",
    METADATA + "/.%5cinternal",
])
async def test_pass_through_forwards_only_plain_discovery_paths(
        passing: RunningSidecar, echo: RecordingUpstream, target: str) -> None:
    answer = await raw_request(passing.proxy_port, "GET", target, [("Host", "sidecar.test")])
    assert answer.status == 404
    assert echo.requests == []


async def test_pass_through_discovery_refuses_a_key_in_the_query(
        passing: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await passing.create_key()
    for query in (f"x={key}", "access_token=abc"):
        answer = await raw_request(passing.proxy_port, "GET", f"{METADATA}?{query}", [("Host", "sidecar.test")])
        assert answer.status == 400
    assert echo.requests == []


async def test_a_subject_with_list_syntax_is_refused(validating: RunningSidecar, issuer: AuthorizationServer,
                                                     echo: RecordingUpstream) -> None:
    token = issuer.mint("x, key:key_ABC", audience=_resource(validating))
    status, _, _ = await _send(validating, headers={"Authorization": f"Bearer {token}"})
    assert status == 401
    assert echo.requests == []


def test_only_loopback_addresses_may_serve_keys_over_plain_http() -> None:
    assert oauth._acceptable_url("http://127.0.0.1:8000/jwks")
    assert oauth._acceptable_url("http://[::1]:8000/jwks")
    assert not oauth._acceptable_url("http://127.attacker.example/jwks")
    assert oauth._acceptable_url("https://login.example.com/jwks")
