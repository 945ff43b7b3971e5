"""End to end: the official MCP SDK client, through the sidecar, to the official MCP SDK server
(``demo.server``), in both protocol eras: 2025 sessions (initialize, GET stream,
DELETE) with ``mode="legacy"`` and 2026-07-28 stateless requests with the default ``"auto"``."""

from __future__ import annotations

import json
import time

import pytest
from mcp import MCPError

from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter
from tests.support.mcp import WireLog, call_tool_timed, http_client, mcp_client, mcp_url, tool_result_text
from tests.support.polling import eventually

MODES = ["legacy", "auto"]
ERAS = {"legacy": "2025-11-25", "auto": "2026-07-28"}
SPOOFED = {
    "X-Toolio-Key-Id": "key_spoofed",
    "x-toolio-roles": "org-admin",
    "X_Toolio_Key_Name": "spoofed",
    "X-Toolio-Permissions": "org:settings",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Host": "evil.example",
}


@pytest.fixture
async def mcp_sidecar(config: ConfigFactory, start_sidecar: SidecarStarter, mcp_upstream: str) -> RunningSidecar:
    return await start_sidecar(config.settings({"proxy": {"upstream": mcp_upstream}}))


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_client_calls_tools_on_sdk_server_through_the_sidecar(
        mcp_sidecar: RunningSidecar, mcp_upstream: str, mode: str) -> None:
    record, key = await mcp_sidecar.create_key("claude-agent", ["writer", "viewer"])
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, mode=mode, extra_headers=SPOOFED) as client:
        assert client.protocol_version == ERAS[mode]
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"add", "echo", "slow_count", "whoami"} <= tools
        added = await client.call_tool("add", {"a": 2, "b": 40})
        assert added.structured_content == {"result": 42}
        assert tool_result_text(await client.call_tool("echo", {"text": "héllo"})) == "héllo"
        seen = (await client.call_tool("whoami", {})).structured_content
    assert seen is not None
    assert seen["key_id"] == record.id
    assert seen["key_name"] == "claude-agent"
    assert seen["workspace"] == "acme"
    assert seen["roles"] == "viewer,writer"
    assert seen["permissions"] == "plans:read,plans:write"
    assert seen["assertion_present"] is True
    assert seen["authorization_present"] is False
    assert seen["protocol_version"] == ERAS[mode]
    # The SDK server's DNS-rebinding protection saw its own Host; ours went in X-Forwarded-Host.
    assert seen["host"] == mcp_upstream.removeprefix("http://")
    assert seen["forwarded_host"] == mcp_sidecar.proxy_url.removeprefix("http://")
    assert seen["forwarded_for"] == "127.0.0.1"
    assert seen["forwarded_proto"] == "http"
    counts = seen["header_counts"]
    assert {name: counts.get(name) for name in (
        "x-toolio-key-id", "x-toolio-key-name", "x-toolio-workspace", "x-toolio-roles", "x-toolio-permissions",
        "x-toolio-assertion", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "host",
    )} == dict.fromkeys(("x-toolio-key-id", "x-toolio-key-name", "x-toolio-workspace", "x-toolio-roles",
                         "x-toolio-permissions", "x-toolio-assertion", "x-forwarded-for", "x-forwarded-proto",
                         "x-forwarded-host", "host"), 1)
    assert "authorization" not in counts
    assert not [name for name in counts if "_" in name]


@pytest.mark.parametrize("mode", MODES)
async def test_progress_notifications_arrive_while_the_tool_runs(mcp_sidecar: RunningSidecar, mode: str) -> None:
    _, key = await mcp_sidecar.create_key()
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, mode=mode) as client:
        call = await call_tool_timed(client, "slow_count", {"steps": 4, "delay": 0.3})
    assert tool_result_text(call.result) == "counted to 4"
    assert [event.progress for event in call.progress] == [1, 2, 3, 4]
    assert call.progress[0].message == "step 1/4"
    # First progress ~0.3 s in, result ~1.2 s in: streamed through, not held back until the end.
    assert call.progress[0].at - call.started < 0.9
    assert call.first_progress_lead > 0.5


async def test_legacy_session_opens_its_get_stream_and_deletes_through_the_sidecar(
        mcp_sidecar: RunningSidecar) -> None:
    _, key = await mcp_sidecar.create_key()
    wire = WireLog()
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, mode="legacy", wire_log=wire) as client:
        await client.call_tool("add", {"a": 1, "b": 1})
    session_ids = {r.headers.get("mcp-session-id") for r in wire.responses("POST")} - {None}
    assert len(session_ids) == 1
    gets = wire.responses("GET")
    assert gets
    assert gets[0].status == 200
    assert gets[0].content_type is not None
    assert gets[0].content_type.startswith("text/event-stream")
    assert all(r.headers.get("mcp-session-id") in session_ids for r in wire.requests("GET"))
    assert [r.status for r in wire.responses("DELETE")] == [200]
    assert all(r.status is not None and r.status < 300 for r in wire.responses())


async def test_auto_mode_speaks_stateless_2026_requests_through_the_sidecar(mcp_sidecar: RunningSidecar) -> None:
    _, key = await mcp_sidecar.create_key()
    wire = WireLog()
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, wire_log=wire) as client:
        await client.call_tool("echo", {"text": "x"})
    assert {r.method for r in wire.requests()} == {"POST"}
    assert wire.requests("POST")[0].headers["mcp-method"] == "server/discover"
    assert all(r.status == 200 for r in wire.responses())
    access = [line for line in mcp_sidecar.log_lines() if line["type"] == "access"]
    assert ("tools/call", "echo") in {(line["mcp_method"], line["mcp_name"]) for line in access}


async def test_legacy_session_cannot_be_used_with_another_key(mcp_sidecar: RunningSidecar) -> None:
    _, owner = await mcp_sidecar.create_key("owner")
    _, intruder = await mcp_sidecar.create_key("intruder")
    wire = WireLog()
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=owner, mode="legacy", wire_log=wire) as client:
        await client.call_tool("add", {"a": 1, "b": 2})
        session_id = next(r.headers["mcp-session-id"] for r in wire.responses("POST")
                          if "mcp-session-id" in r.headers)
        body = {"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": ERAS["legacy"],
                   "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with http_client(intruder) as http:
            stolen = await http.post(mcp_url(mcp_sidecar.proxy_url), content=json.dumps(body), headers=headers)
            hijack_stream = await http.delete(mcp_url(mcp_sidecar.proxy_url), headers=headers)
        assert stolen.status_code == 403
        assert stolen.json()["error"] == "session_forbidden"
        assert hijack_stream.status_code == 403
        # The owner's session is untouched.
        assert (await client.call_tool("add", {"a": 2, "b": 2})).structured_content == {"result": 4}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@pytest.mark.parametrize("token", [None, "tak_not_a_real_key"])
async def test_sdk_client_without_a_valid_key_is_refused(mcp_sidecar: RunningSidecar, token: str | None) -> None:
    wire = WireLog()
    with pytest.raises((MCPError, BaseExceptionGroup)) as caught:
        async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=token, wire_log=wire) as client:
            await client.list_tools()
    assert any(isinstance(leaf, MCPError) for leaf in _leaves(caught.value))
    statuses = {r.status for r in wire.responses()}
    assert statuses == {401}


async def test_disabling_a_key_mid_session_refuses_its_next_call_and_enabling_restores_it(
        mcp_sidecar: RunningSidecar) -> None:
    record, key = await mcp_sidecar.create_key()
    wire = WireLog()
    with pytest.raises((MCPError, BaseExceptionGroup)) as caught:  # noqa: PT012 - the session ends in the refusal
        async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, mode="legacy", wire_log=wire) as client:
            assert (await client.call_tool("add", {"a": 1, "b": 1})).structured_content == {"result": 2}
            streams = mcp_sidecar.services.streams
            await eventually(lambda: len(streams) == 1)  # the session's standalone GET stream is open
            await mcp_sidecar.disable(record.id)
            started = time.monotonic()
            await eventually(lambda: len(streams) == 0)
            assert time.monotonic() - started < 1.0  # ...and is cut within 1 s
            await client.call_tool("add", {"a": 1, "b": 2})
    assert any(isinstance(leaf, MCPError) for leaf in _leaves(caught.value))
    assert 401 in {r.status for r in wire.responses()}
    await mcp_sidecar.enable(record.id)
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=key, mode="legacy") as client:
        assert (await client.call_tool("add", {"a": 2, "b": 3})).structured_content == {"result": 5}
