"""The tool policy end to end (docs/reference/tool-policy.md): the official MCP SDK client and
server on both sides, in both protocol eras, answering with events and with plain JSON; raw
requests for what an SDK never sends (batches, mismatched routing headers, odd bodies); raw
upstreams for tool lists split across many reads and for replayed event streams."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from mcp import MCPError
from mcp.server import MCPServer

from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter
from tests.support.mcp import mcp_client, mcp_url
from tests.support.metrics import sample
from tests.support.raw import RawResponse, exchange, parse_responses, raw_request
from tests.support.upstreams import (
    RecordingUpstream,
    UpstreamConnection,
    example_upstream,
    recording_upstream,
)

MODES = ["legacy", "auto"]
POLICY_ROLES = {
    "whoami-only": {"description": "Only whoami", "permissions": ["plans:read"], "tools": ["whoami"]},
    "getters": {"description": "Read tools", "permissions": ["plans:read"], "tools": ["get_*"]},
}
CALL_ADD = {"jsonrpc": "2.0", "id": 41, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}
CALL_WHOAMI = {"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
LIST = {"jsonrpc": "2.0", "id": 43, "method": "tools/list"}


def _policy_settings(config: ConfigFactory, upstream: str, **extra: Any) -> Any:
    return config.settings({"proxy": {"upstream": upstream}, "roles": POLICY_ROLES, **extra})


def recording_server(calls: list[str]) -> MCPServer:
    """An official-SDK MCP server whose every tool notes that it ran."""
    server: MCPServer = MCPServer("policy-test", log_level="WARNING")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        calls.append("add")
        return a + b

    @server.tool(description="Who is calling.")
    def whoami() -> str:
        calls.append("whoami")
        return "you"

    @server.tool(description="One plan.")
    def get_plan(plan: str) -> str:
        calls.append("get_plan")
        return plan

    return server


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture(params=[False, True], ids=["events", "json"])
async def policy_upstream(request: pytest.FixtureRequest, calls: list[str]) -> AsyncIterator[str]:
    async with example_upstream(server=recording_server(calls), json_response=request.param) as url:
        yield url


@pytest.mark.parametrize("mode", MODES)
async def test_a_key_sees_and_calls_only_the_tools_its_roles_allow(
        config: ConfigFactory, start_sidecar: SidecarStarter, policy_upstream: str, calls: list[str],
        mode: str) -> None:
    sc = await start_sidecar(_policy_settings(config, policy_upstream))
    _, key = await sc.create_key("narrow", ["whoami-only"])
    async with mcp_client(mcp_url(sc.proxy_url), token=key, mode=mode) as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["whoami"]
        assert (await client.call_tool("whoami", {})).is_error is False
        with pytest.raises(MCPError) as caught:
            await client.call_tool("add", {"a": 1, "b": 2})
        # Unknown tool, as the server would say of a tool it does not have: nothing is revealed.
        assert caught.value.error.code == -32602
        assert caught.value.error.message == "Unknown tool: add"
        with pytest.raises(MCPError):
            await client.call_tool("no_such_tool", {})
    assert calls == ["whoami"]  # the refused calls never reached the server


@pytest.mark.parametrize("mode", MODES)
async def test_patterns_of_several_roles_add_up_and_a_role_without_tools_opens_all(
        config: ConfigFactory, start_sidecar: SidecarStarter, policy_upstream: str, calls: list[str],
        mode: str) -> None:
    sc = await start_sidecar(_policy_settings(config, policy_upstream))
    _, both = await sc.create_key("both", ["whoami-only", "getters"])
    _, open_key = await sc.create_key("open", ["whoami-only", "viewer"])
    async with mcp_client(mcp_url(sc.proxy_url), token=both, mode=mode) as client:
        assert sorted(tool.name for tool in (await client.list_tools()).tools) == ["get_plan", "whoami"]
        await client.call_tool("get_plan", {"plan": "p1"})
    async with mcp_client(mcp_url(sc.proxy_url), token=open_key, mode=mode) as client:
        assert sorted(tool.name for tool in (await client.list_tools()).tools) == ["add", "get_plan", "whoami"]
        await client.call_tool("add", {"a": 1, "b": 2})
    assert calls == ["get_plan", "add"]


# -- raw requests ---------------------------------------------------------------------------------


@pytest.fixture
async def recorded(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream
                   ) -> tuple[RunningSidecar, RecordingUpstream, str, str]:
    sc = await start_sidecar(_policy_settings(config, echo.url))
    _, narrow = await sc.create_key("narrow", ["whoami-only"])
    _, open_key = await sc.create_key("open", ["viewer"])
    return sc, echo, narrow, open_key


def _post(key: str, body: bytes, *extra: tuple[str, str], accept: str = "application/json, text/event-stream"
          ) -> list[tuple[str, str]]:
    return [("Host", "sidecar.test"), ("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"),
            ("Accept", accept), *extra]


async def _post_chunked(port: int, key: str, body: bytes) -> RawResponse:
    """POST ``body`` chunked, 10,000 bytes a chunk."""
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part)
                      for part in (body[i:i + 10_000] for i in range(0, len(body), 10_000))) + b"0\r\n\r\n"
    head = "".join(f"{k}: {v}\r\n" for k, v in _post(key, body))
    data = f"POST /mcp HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode() + chunks
    (response,) = parse_responses(await exchange(port, data, wait=20))
    return response


async def test_a_denied_call_is_one_event_for_a_client_that_accepts_only_events(recorded: Any) -> None:
    sc, echo, narrow, _ = recorded
    body = json.dumps(CALL_ADD).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body, accept="text/event-stream"), body)
    assert answer.status == 200
    assert answer.header("Content-Type") == "text/event-stream"
    assert answer.body.startswith(b"event: message\ndata: ") and answer.body.endswith(b"\n\n")
    data = json.loads(answer.body.split(b"data: ", 1)[1])
    assert data == {"jsonrpc": "2.0", "id": 41, "error": {"code": -32602, "message": "Unknown tool: add"}}
    json_answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)
    assert json_answer.header("Content-Type") == "application/json"
    assert json_answer.json() == data
    assert echo.requests == []


async def test_a_denied_notification_is_accepted_and_dropped(recorded: Any) -> None:
    sc, echo, narrow, _ = recorded
    body = json.dumps({k: v for k, v in CALL_ADD.items() if k != "id"}).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)
    assert (answer.status, answer.body) == (202, b"")
    assert echo.requests == []


async def test_a_batch_with_one_forbidden_call_is_refused_whole(recorded: Any) -> None:
    sc, echo, narrow, _ = recorded
    body = json.dumps([CALL_WHOAMI, CALL_ADD]).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)
    assert answer.status == 403
    assert answer.json()["error"] == "tool_forbidden"
    assert echo.requests == []
    allowed = json.dumps([CALL_WHOAMI, LIST, {"jsonrpc": "2.0", "method": "notifications/initialized"}]).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, allowed), allowed)
    assert answer.status == 200
    assert json.loads(answer.json()["body"]) == json.loads(allowed)


@pytest.mark.parametrize(("headers", "key_kind"), [
    ((("Mcp-Method", "tools/list"),), "narrow"),
    ((("Mcp-Method", "tools/call"), ("Mcp-Name", "whoami")), "narrow"),
    ((("Mcp-Method", "tools/call"), ("Mcp-Name", "whoami")), "open"),
    ((("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call")), "open"),
    ((("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "add")), "open"),
])
async def test_routing_headers_that_disagree_with_the_body_get_400_and_json_rpc_error_32020(
        recorded: Any, headers: tuple[tuple[str, str], ...], key_kind: str) -> None:
    sc, echo, narrow, open_key = recorded
    body = json.dumps(CALL_ADD).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp",
                               _post(narrow if key_kind == "narrow" else open_key, body, *headers), body)
    assert answer.status == 400
    reply = answer.json()
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == 41
    assert reply["error"]["code"] == -32020
    assert echo.requests == []


async def test_routing_headers_that_agree_pass(recorded: Any) -> None:
    sc, echo, _, open_key = recorded
    body = json.dumps(CALL_ADD).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(
        open_key, body, ("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "add")),
        body)
    assert answer.status == 200
    assert len(echo.requests) == 1


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami","name":"add"}}',
    json.dumps(CALL_ADD).encode("utf-16"),
])
async def test_a_policy_bound_key_sends_only_bodies_that_can_be_checked(recorded: Any, body: bytes) -> None:
    sc, echo, narrow, open_key = recorded
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_request"
    assert echo.requests == []
    # A key without a tool policy is not this sidecar's to judge: the server answers it.
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(open_key, body), body)
    assert answer.status == 200


async def test_a_denied_call_in_a_large_chunked_body_is_still_denied(recorded: Any) -> None:
    sc, echo, narrow, _ = recorded
    call = {**CALL_ADD, "params": {"name": "add", "arguments": {"pad": "x" * 200_000}}}
    body = json.dumps(call).encode()
    answer = await _post_chunked(sc.proxy_port, narrow, body)
    assert answer.status == 200
    assert answer.json()["error"]["message"] == "Unknown tool: add"
    assert echo.requests == []


async def test_an_allowed_call_in_a_large_chunked_body_arrives_whole(recorded: Any) -> None:
    sc, _, narrow, _ = recorded
    call = {**CALL_WHOAMI, "params": {"name": "whoami", "arguments": {"pad": "y" * 200_000}}}
    body = json.dumps(call).encode()
    answer = await _post_chunked(sc.proxy_port, narrow, body)
    assert answer.status == 200
    assert json.loads(answer.json()["body"]) == call


# -- answers: large lists, split reads, event streams ---------------------------------------------


def _tools(count: int) -> list[dict[str, Any]]:
    return [{"name": f"tool_{i:04d}" if i % 10 else f"get_{i:04d}", "description": "d" * 40,
             "inputSchema": {"type": "object"}} for i in range(count)]


def _list_answer(request_id: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id,
            "result": {"tools": tools, "nextCursor": "page-2", "cacheScope": "public", "ttlMs": 5000}}


def dribbling(answer: Callable[[bytes], tuple[list[tuple[str, str]], bytes, bool]], piece: int = 700
              ) -> Callable[[UpstreamConnection], Any]:
    """An upstream that writes its answer in small pieces, each its own TCP write, so the
    sidecar reads it in many parts."""

    async def behaviour(conn: UpstreamConnection) -> None:
        seen = await conn.read_request()
        fields, body, chunked = answer(bytes(seen.body))
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in [*fields, *framing]) + "\r\n"
        conn.write(head.encode())
        for start in range(0, len(body), piece):
            part = body[start:start + piece]
            conn.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            await conn.drain()
            await asyncio.sleep(0)
        if chunked:
            conn.write(b"0\r\n\r\n")
        await conn.until_client_closes()

    return behaviour


@pytest.mark.parametrize("form", ["json-length", "json-chunked", "events"])
async def test_a_thousand_tool_list_split_across_many_reads_is_filtered(
        config: ConfigFactory, start_sidecar: SidecarStarter, form: str) -> None:
    tools = _tools(1000)

    def answer(request: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        data = json.dumps(_list_answer(json.loads(request)["id"], tools)).encode()
        if form == "events":
            # Two data lines for one message, CRLF line ends, a notification event before it.
            half = len(data) // 2
            event = (b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/message",'
                     b'"params":{"level":"info","data":"tools"}}\r\n\r\n'
                     b"id: 7\r\nevent: message\r\ndata: " + data[:half] + b"\r\ndata: " + data[half:] + b"\r\n\r\n")
            return [("Content-Type", "text/event-stream")], event, True
        return [("Content-Type", "application/json")], data, form == "json-chunked"

    async with recording_upstream(dribbling(answer)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        body = json.dumps(LIST).encode()
        reply = await raw_request(sc.proxy_port, "POST", "/mcp", _post(key, body), body, wait=30)
        assert upstream.requests[0].all("Accept-Encoding") == ["identity"]
    assert reply.status == 200
    if form == "events":
        events = reply.body.replace(b"\r\n", b"\n").split(b"\n\n")
        assert b"notifications/message" in events[0]
        message = json.loads(b"\n".join(line[6:] for line in events[1].split(b"\n") if line.startswith(b"data: ")))
        assert b"id: 7\nevent: message\n" in events[1]
    else:
        message = reply.json()
    result = message["result"]
    assert [tool["name"] for tool in result["tools"]] == [f"get_{i:04d}" for i in range(0, 1000, 10)]
    assert result["nextCursor"] == "page-2"
    assert result["cacheScope"] == "private"
    assert message["id"] == 43


async def test_a_get_stream_that_replays_a_tool_list_is_filtered_too(
        config: ConfigFactory, start_sidecar: SidecarStarter) -> None:
    # A client resuming with Last-Event-ID gets an earlier POST's events again on a GET stream.
    def answer(_: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        data = json.dumps(_list_answer(43, _tools(30))).encode()
        return [("Content-Type", "text/event-stream")], b"id: 3\ndata: " + data + b"\n\n", True

    async with recording_upstream(dribbling(answer, piece=100)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        reply = await raw_request(sc.proxy_port, "GET", "/mcp", [
            ("Host", "sidecar.test"), ("Authorization", f"Bearer {key}"), ("Accept", "text/event-stream"),
            ("Last-Event-ID", "2")], wait=30)
    message = json.loads(reply.body.split(b"data: ", 1)[1])
    assert [tool["name"] for tool in message["result"]["tools"]] == ["get_0000", "get_0010", "get_0020"]


async def test_a_compressed_answer_that_cannot_be_filtered_is_not_sent(
        config: ConfigFactory, start_sidecar: SidecarStarter) -> None:
    def answer(_: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        data = gzip.compress(json.dumps(_list_answer(43, _tools(5))).encode())
        return [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], data, False

    async with recording_upstream(dribbling(answer)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        body = json.dumps(LIST).encode()
        reply = await raw_request(sc.proxy_port, "POST", "/mcp", _post(key, body, ("Accept-Encoding", "gzip")), body)
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_unfilterable"


@pytest.mark.parametrize("mode", MODES)
async def test_the_access_log_names_the_mcp_method_and_tool_in_both_eras(
        config: ConfigFactory, start_sidecar: SidecarStarter, mcp_upstream: str, mode: str) -> None:
    sc = await start_sidecar(_policy_settings(config, mcp_upstream))
    _, key = await sc.create_key("narrow", ["whoami-only"])
    async with mcp_client(mcp_url(sc.proxy_url), token=key, mode=mode) as client:
        await client.call_tool("whoami", {})
        with pytest.raises(MCPError):
            await client.call_tool("echo", {"text": "x"})
    access = [line for line in sc.log_lines() if line.get("type") == "access" and line.get("method") == "POST"]
    calls = [(line["mcp_method"], line["mcp_name"], line["status"]) for line in access
             if line["mcp_method"] == "tools/call"]
    assert calls == [("tools/call", "whoami", 200), ("tools/call", "echo", 200)]


@pytest.mark.parametrize("mode", MODES)
async def test_every_tool_call_allowed_or_denied_is_an_audit_event_with_the_keys_name(
        config: ConfigFactory, start_sidecar: SidecarStarter, policy_upstream: str, mode: str) -> None:
    sc = await start_sidecar(_policy_settings(config, policy_upstream))
    record, key = await sc.create_key("narrow-agent", ["whoami-only"])
    async with mcp_client(mcp_url(sc.proxy_url), token=key, mode=mode) as client:
        await client.call_tool("whoami", {})
        with pytest.raises(MCPError):
            await client.call_tool("add", {"a": 1, "b": 2})
        await client.list_tools()  # not a call: no event
    await sc.services.activity.flush()
    events = await sc.services.store.list_audit("acme", 50, None, action="tool.called", key_id=record.id)
    assert [(e.key_name, e.actor, e.details["tool"], e.details["outcome"], e.client) for e in reversed(events)] == [
        ("narrow-agent", "narrow-agent", "whoami", "allowed", "127.0.0.1"),
        ("narrow-agent", "narrow-agent", "add", "denied", "127.0.0.1"),
    ]
    assert sample(sc.services.registry, "toolio_sidecar_tool_calls_total", outcome="denied") == 1


async def test_a_refused_batch_records_each_of_its_calls_as_denied(recorded: Any) -> None:
    sc, echo, narrow, open_key = recorded
    body = json.dumps([CALL_WHOAMI, CALL_ADD]).encode()
    assert (await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)).status == 403
    # A key without a tool policy: its calls, even in a large chunked body, are recorded as allowed.
    big = json.dumps({**CALL_ADD, "params": {"name": "add", "arguments": {"pad": "z" * 100_000}}}).encode()
    assert (await _post_chunked(sc.proxy_port, open_key, big)).status == 200
    await sc.services.activity.flush()
    events = await sc.services.store.list_audit("acme", 50, None, action="tool.called")
    assert sorted((e.key_name, e.details["tool"], e.details["outcome"]) for e in events) == [
        ("narrow", "add", "denied"), ("narrow", "whoami", "denied"), ("open", "add", "allowed")]
    assert len(echo.requests) == 1
