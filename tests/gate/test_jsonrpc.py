"""Reading a JSON-RPC body: methods, ids, names; duplicate members refused; the routing headers
(Mcp-Method / Mcp-Name) compared with the body as MCP 2026-07-28 servers compare them."""

from __future__ import annotations

import base64
import json

import pytest

from sidecar.gate.jsonrpc import McpMessage, Unreadable, header_mismatch, parse


def _body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_a_single_tools_call_names_its_tool() -> None:
    message = parse(_body({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                           "params": {"name": "add", "arguments": {"a": 1}}}))
    assert not message.batch
    (call,) = message.calls
    assert (call.method, call.id, call.has_id, call.name, call.name_present) == ("tools/call", 3, True, "add", True)


def test_a_batch_lists_every_message_including_answers_and_notifications() -> None:
    message = parse(_body([
        {"jsonrpc": "2.0", "id": "a", "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 9, "result": {}},
        7,
    ]))
    assert message.batch
    assert [(c.method, c.has_id) for c in message.calls] == [
        ("tools/list", True), ("notifications/initialized", False), (None, True), (None, False)]


def test_a_non_string_tool_name_is_present_but_not_a_name() -> None:
    (call,) = parse(_body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": ["add"]}})).calls
    assert call.name is None
    assert call.name_present


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami","name":"add"}}',
    b'{"method":"tools/list","method":"tools/call"}',
])
def test_a_member_named_twice_is_unreadable(body: bytes) -> None:
    with pytest.raises(Unreadable, match="appears twice"):
        parse(body)


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'"text"', b"\xff\xfe", b"[" * 100_000, b"{\"a\":1"])
def test_what_is_not_a_json_rpc_message_is_unreadable(body: bytes) -> None:
    with pytest.raises(Unreadable):
        parse(body)


def _mismatch(body: object, *, version: str | None = None, methods: tuple[str, ...] = (),
              names: tuple[str, ...] = ()) -> str | None:
    message: McpMessage = parse(_body(body))
    return header_mismatch(message, protocol_version=version, methods=list(methods), names=list(names))


CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}}


def test_matching_routing_headers_pass() -> None:
    assert _mismatch(CALL, version="2026-07-28", methods=("tools/call",), names=("add",)) is None


def test_a_base64_encoded_name_matches_its_decoded_value() -> None:
    call = {**CALL, "params": {"name": "añadir"}}
    encoded = "=?base64?" + base64.b64encode("añadir".encode()).decode() + "?="
    assert _mismatch(call, version="2026-07-28", methods=("tools/call",), names=(encoded,)) is None
    assert _mismatch(call, version="2026-07-28", methods=("tools/call",), names=("=?base64?!!?=",)) is not None


@pytest.mark.parametrize(("version", "methods", "names"), [
    ("2026-07-28", ("tools/list",), ("add",)),     # another method
    ("2026-07-28", ("tools/call",), ("whoami",)),  # another tool
    ("2026-07-28", (), ("add",)),                  # a modern client always names the method
    ("2026-07-28", ("tools/call",), ()),           # ... and the tool
    ("2026-07-28", ("tools/call", "tools/call"), ("add",)),
    ("2026-07-28", ("tools/call",), ("add", "add")),
    ("2025-11-25", ("tools/list",), ()),           # an earlier client need not send them, but
    ("2025-11-25", (), ("whoami",)),               # what it sends must agree
    (None, ("tools/call",), ("whoami",)),
])
def test_routing_headers_that_disagree_with_the_body_are_named(
        version: str | None, methods: tuple[str, ...], names: tuple[str, ...]) -> None:
    assert _mismatch(CALL, version=version, methods=methods, names=names) is not None


def test_an_earlier_client_without_routing_headers_passes() -> None:
    assert _mismatch(CALL, version="2025-11-25") is None
    assert _mismatch(CALL) is None


def test_routing_headers_on_a_batch_disagree_with_it() -> None:
    assert _mismatch([CALL], methods=("tools/call",)) is not None
    assert _mismatch([CALL]) is None


def test_mcp_name_on_a_method_without_a_name_disagrees() -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert _mismatch(body, version="2026-07-28", methods=("tools/list",)) is None
    assert _mismatch(body, version="2026-07-28", methods=("tools/list",), names=("add",)) is not None
