"""End to end with users who sign in (docs/operations.md, Users who sign in): the official MCP SDK
client runs its OAuth sign-in on its own (401 -> protected resource metadata -> authorization
server metadata -> dynamic registration -> authorize with PKCE -> token) through the sidecar,
against a real authorization server (tests.support.oauth) and the bundled example MCP server, in
both protocol eras; in ``validate`` mode the sidecar checks the token, in ``pass-through`` mode
the MCP server does. Agents with keys use the same endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from mcp.server.auth.settings import AuthSettings

from demo.server import ExampleServerHandle, build_example_server
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter
from tests.support.mcp import mcp_client, mcp_url
from tests.support.oauth import AuthorizationServer, UpstreamTokenVerifier, authorization_server, signed_in_client
from tests.support.raw import LOOPBACK, free_port

MODES = ["legacy", "auto"]
ERAS = {"legacy": "2025-11-25", "auto": "2026-07-28"}
METADATA = "/.well-known/oauth-protected-resource"


@pytest.fixture
async def issuer() -> AsyncIterator[AuthorizationServer]:
    async with authorization_server() as server:
        yield server


def _settings(config: ConfigFactory, port: int, upstream: str, oauth: dict[str, Any]) -> Any:
    return config.settings({"proxy": {"upstream": upstream, "listen": f"{LOOPBACK}:{port}"}, "oauth": oauth})


@pytest.fixture
async def validating(config: ConfigFactory, start_sidecar: SidecarStarter, mcp_upstream: str,
                     issuer: AuthorizationServer) -> RunningSidecar:
    port = free_port()
    return await start_sidecar(_settings(config, port, mcp_upstream, {
        "mode": "validate", "issuer": issuer.issuer, "resource": f"http://{LOOPBACK}:{port}/mcp"}))


@pytest.mark.parametrize("mode", MODES)
async def test_a_user_signs_in_through_the_sidecar_and_the_server_sees_who(
        validating: RunningSidecar, issuer: AuthorizationServer, mode: str) -> None:
    issuer.user.roles = ["writer", "unknown-role"]
    url = mcp_url(validating.proxy_url)
    async with signed_in_client(url, mode=mode) as signed_in:
        client = signed_in.client
        assert client.protocol_version == ERAS[mode]
        assert {"add", "whoami"} <= {tool.name for tool in (await client.list_tools()).tools}
        assert (await client.call_tool("add", {"a": 2, "b": 40})).structured_content == {"result": 42}
        seen = (await client.call_tool("whoami", {})).structured_content
    assert seen is not None
    assert seen["subject"] == "user:alice"
    assert seen["key_id"] == "user:alice"
    assert seen["key_name"] == "alice@example.com"
    assert seen["roles"] == "writer"
    assert seen["permissions"] == "plans:read,plans:write"
    assert seen["assertion_present"] is True
    assert seen["authorization_present"] is False
    assert seen["header_counts"]["x-toolio-subject"] == 1
    # The sign-in really ran: the first answer was the sidecar's challenge, the metadata came from
    # the sidecar, the browser went to the authorization server, and a token was issued for us.
    responses = signed_in.wire.responses()
    assert responses[0].status == 401
    metadata = [r for r in responses if r.path.startswith(METADATA)]
    assert metadata and metadata[0].status == 200
    assert signed_in.browser.visits and signed_in.browser.visits[0].startswith(issuer.issuer + "/authorize?")
    assert signed_in.storage.tokens is not None
    assert issuer.tokens_issued == 1
    assert {line["kind"] for line in validating.log_lines() if line["type"] == "access"} == {"user", "none"}


async def test_a_signed_in_client_reuses_its_token_until_it_is_refused(
        validating: RunningSidecar, issuer: AuthorizationServer) -> None:
    url = mcp_url(validating.proxy_url)
    async with signed_in_client(url) as first:
        await first.client.call_tool("add", {"a": 1, "b": 1})
    storage = first.storage
    async with signed_in_client(url, storage=storage) as again:
        await again.client.call_tool("add", {"a": 1, "b": 1})
    assert again.browser.visits == []          # no second sign-in: the stored token still works
    assert issuer.tokens_issued == 1
    # The authorization server withdraws its old key; the sidecar learns it at its next fetch of
    # the key set (here: the first token signed with the new key).
    issuer.rotate(keep_old=False)
    async with httpx2.AsyncClient(trust_env=False) as http:
        response = await http.post(url, headers={"Authorization": f"Bearer {issuer.mint('bob', audience=url)}"})
    assert response.status_code != 401
    async with signed_in_client(url, storage=storage) as after:
        await after.client.call_tool("add", {"a": 1, "b": 1})
    assert len(after.browser.visits) == 1      # refused, so the client signed in once more
    assert issuer.tokens_issued == 2


@pytest.mark.parametrize("mode", MODES)
async def test_agents_with_keys_use_the_same_endpoint_as_users(validating: RunningSidecar, mode: str) -> None:
    record, key = await validating.create_key("ci-agent", ["viewer"])
    async with mcp_client(mcp_url(validating.proxy_url), token=key, mode=mode) as client:
        seen = (await client.call_tool("whoami", {})).structured_content
    assert seen is not None
    assert (seen["key_id"], seen["subject"], seen["roles"]) == (record.id, f"key:{record.id}", "viewer")
    assert seen["authorization_present"] is False


@pytest.mark.parametrize("mode", MODES)
async def test_pass_through_lets_an_mcp_server_that_does_its_own_oauth_sign_users_in(
        config: ConfigFactory, start_sidecar: SidecarStarter, issuer: AuthorizationServer, mode: str) -> None:
    port = free_port()
    resource = f"http://{LOOPBACK}:{port}/mcp"
    verifier = UpstreamTokenVerifier(issuer, resource)
    # The MCP server is its own resource server (the SDK's): it challenges, serves its metadata
    # and checks tokens; the sidecar in front only passes them through.
    server = build_example_server(
        # From strings, so the issuer keeps its exact spelling (no "/" added: RFC 8414 3.3 compares).
        auth=AuthSettings.model_validate({"issuer_url": issuer.issuer, "resource_server_url": resource,
                                          "validate_token_resource": False}),
        token_verifier=verifier)
    async with ExampleServerHandle(LOOPBACK, 0, server=server) as upstream:
        sidecar = await start_sidecar(_settings(config, port, upstream.base_url, {"mode": "pass-through"}))
        async with signed_in_client(mcp_url(sidecar.proxy_url), mode=mode) as signed_in:
            seen = (await signed_in.client.call_tool("whoami", {})).structured_content
        assert seen is not None
        assert seen["authorization_present"] is True
        assert seen["assertion_present"] is False
        assert all(seen[name] is None for name in ("key_id", "key_name", "roles", "subject"))
        assert not [name for name in seen["header_counts"] if name.startswith("x-toolio-")]
        assert "alice" in verifier.verified
        metadata = [r for r in signed_in.wire.responses() if r.path.startswith(METADATA)]
        assert metadata and metadata[-1].status == 200     # the server's own, through the sidecar
        kinds = {line["kind"] for line in sidecar.log_lines() if line["type"] == "access"}
        assert "passthrough" in kinds
