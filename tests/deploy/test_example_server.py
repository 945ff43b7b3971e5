"""The bundled example MCP server, spoken to directly (no sidecar) in both transport eras.

These prove the MCP test scaffolding in ``tests.support``; the proxy tests reuse it with the
sidecar in between.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest

from demo.server import ExampleServerHandle
from tests.support.mcp import WireLog, call_tool_timed, http_client, mcp_client, mcp_url, tool_result_text
from tests.support.upstreams import example_upstream

# Works with asyncio_mode "strict" as well as "auto".
pytestmark = pytest.mark.asyncio

MODES = ["legacy", "auto"]
ERAS = {"legacy": "2025-11-25", "auto": "2026-07-28"}
IDENTITY_KEYS = {"key_id", "key_name", "workspace", "roles", "permissions"}


@pytest.mark.parametrize("stateless", [False, True], ids=["stateful", "stateless"])
@pytest.mark.parametrize("mode", MODES)
async def test_add_and_echo(mode: str, stateless: bool) -> None:
    async with (
        example_upstream(stateless=stateless) as base,
        mcp_client(mcp_url(base), token="t", mode=mode) as client,
    ):
        assert client.protocol_version == ERAS[mode]
        added = await client.call_tool("add", {"a": 2, "b": 40})
        assert not added.is_error
        assert added.structured_content == {"result": 42}
        assert tool_result_text(added) == "42"
        echoed = await client.call_tool("echo", {"text": "héllo, wörld"})
        assert tool_result_text(echoed) == "héllo, wörld"


@pytest.mark.parametrize("mode", MODES)
async def test_progress_arrives_while_the_tool_runs(mode: str) -> None:
    async with example_upstream() as base, mcp_client(mcp_url(base), token="t", mode=mode) as client:
        call = await call_tool_timed(client, "slow_count", {"steps": 4, "delay": 0.3})
    assert tool_result_text(call.result) == "counted to 4"
    assert [e.progress for e in call.progress] == [1, 2, 3, 4]
    assert call.progress[0].total == 4
    assert call.progress[0].message == "step 1/4"
    # ~0.3 s after the call starts, ~0.9 s before it returns: streamed, not batched at the end.
    assert call.first_progress_lead > 0.5
    assert call.progress[0].at - call.started < 0.9


@pytest.mark.parametrize("mode", MODES)
async def test_whoami_reports_the_headers_it_received(mode: str) -> None:
    identity = {
        "X-Toolio-Key-Id": "k_123",
        "X-Toolio-Key-Name": "ci bot",
        "X-Toolio-Workspace": "acme",
        "X-Toolio-Roles": "admin,reader",
        "X-Toolio-Permissions": "tools:call,tools:list",
        "X-Toolio-Assertion": "a.b.c",
    }
    async with (
        example_upstream() as base,
        mcp_client(mcp_url(base), token="t", mode=mode, extra_headers=identity) as client,
    ):
        result = await client.call_tool("whoami", {})
    seen = result.structured_content
    assert seen is not None
    assert seen["key_id"] == "k_123"
    assert seen["key_name"] == "ci bot"
    assert seen["workspace"] == "acme"
    assert seen["roles"] == "admin,reader"
    assert seen["permissions"] == "tools:call,tools:list"
    assert seen["assertion_present"] is True
    assert seen["authorization_present"] is True
    assert seen["protocol_version"] == ERAS[mode]
    assert seen["host"] == base.removeprefix("http://")
    assert seen["header_counts"]["x-toolio-key-id"] == 1
    assert seen["header_counts"]["authorization"] == 1


async def test_whoami_without_identity_headers() -> None:
    async with example_upstream() as base, mcp_client(mcp_url(base), token=None) as client:
        seen = (await client.call_tool("whoami", {})).structured_content
    assert seen is not None
    assert seen.keys() >= IDENTITY_KEYS
    assert all(seen[k] is None for k in IDENTITY_KEYS)
    assert seen["assertion_present"] is False
    assert seen["authorization_present"] is False


async def test_legacy_session_uses_session_id_get_stream_and_delete() -> None:
    wire = WireLog()
    async with example_upstream() as base:
        async with mcp_client(mcp_url(base), token="t", mode="legacy", wire_log=wire) as client:
            await client.call_tool("add", {"a": 1, "b": 1})
        first = wire.requests("POST")[0]
        assert "mcp-protocol-version" not in first.headers  # initialize
        session_ids = {r.headers.get("mcp-session-id") for r in wire.responses("POST")}
        assert len(session_ids - {None}) == 1
        assert wire.requests("GET"), "the client opens the standalone GET SSE stream"
        assert [r.status for r in wire.responses("DELETE")] == [200]
        assert all(r.headers.get("authorization") == "Bearer t" for r in wire.requests())


async def test_auto_mode_sends_stateless_2026_requests() -> None:
    wire = WireLog()
    async with example_upstream() as base:
        async with mcp_client(mcp_url(base), token="t", mode="auto", wire_log=wire) as client:
            await client.call_tool("echo", {"text": "x"})
        posts = wire.requests("POST")
        assert {r.method for r in wire.requests()} == {"POST"}  # no GET stream, no DELETE
        assert posts[0].headers["mcp-method"] == "server/discover"
        assert all(r.headers["mcp-protocol-version"] == "2026-07-28" for r in posts)
        calls = [r for r in posts if r.headers["mcp-method"] == "tools/call"]
        assert [r.headers["mcp-name"] for r in calls] == ["echo"]
        assert not any("mcp-session-id" in r.headers for r in wire.records)


async def test_dns_rebinding_protection_is_on() -> None:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
    headers = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "server/discover",
    }
    async with example_upstream() as base, http_client(None) as http:
        ok = await http.post(mcp_url(base), json=body, headers=headers)
        assert ok.status_code == 200
        bad_host = await http.post(mcp_url(base), json=body, headers={**headers, "Host": "evil.example"})
        assert bad_host.status_code == 421
        bad_origin = await http.post(
            mcp_url(base), json=body, headers={**headers, "Origin": "https://evil.example"}
        )
        assert bad_origin.status_code == 403


async def test_stop_is_prompt_with_an_open_get_stream() -> None:
    # A legacy client still connected (GET stream open) must not stall the upstream's shutdown.
    handle = ExampleServerHandle("127.0.0.1", 0, shutdown_timeout=1)
    await handle.start()
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(mcp_client(handle.url, token="t", mode="legacy"))
        await client.call_tool("add", {"a": 1, "b": 2})
        started = time.monotonic()
        await handle.stop()
        assert time.monotonic() - started < 4
        assert not handle.running
        # Leaving the client now (its DELETE fails against a dead server) must not raise.
