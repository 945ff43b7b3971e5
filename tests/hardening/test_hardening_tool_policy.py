"""Attacks on the tool policy (docs/reference/tool-policy.md), each found by trying it against a
running sidecar: bodies a server would read differently from us, answers that carry a tool list
on another request's answer, answers the filter cannot read, bodies made to cost memory."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.proxy.test_tool_policy import (
    CALL_ADD,
    CALL_WHOAMI,
    _list_answer,
    _policy_settings,
    _post,
    _tools,
    dribbling,
)
from tests.support.config import ConfigFactory
from tests.support.harness import SidecarStarter
from tests.support.raw import exchange, parse_responses, raw_request
from tests.support.upstreams import RecordingUpstream, recording_upstream

PING = {"jsonrpc": "2.0", "id": "1000", "method": "ping"}


@pytest.fixture
async def keys(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream
               ) -> tuple[Any, RecordingUpstream, str, str]:
    sc = await start_sidecar(_policy_settings(config, echo.url))
    _, narrow = await sc.create_key("narrow", ["whoami-only"])
    _, open_key = await sc.create_key("open", ["viewer"])
    return sc, echo, narrow, open_key


@pytest.mark.parametrize("header", [
    ("Content-Type", "application/json; charset=utf-7"),
    ("Content-Type", 'application/json; charset="UTF-16"'),
    ("Content-Type", "text/plain"),
    ("Content-Encoding", "gzip"),
])
async def test_a_policy_bound_key_sends_json_only_as_utf8_without_coding(
        keys: Any, header: tuple[str, str]) -> None:
    # UTF-7 reads '+ACI-name+ACI-:...' as a second "name" member to a server that honours the
    # charset: the same bytes would name an allowed tool here and another one there.
    sc, echo, narrow, _ = keys
    body = json.dumps({**CALL_WHOAMI, "params": {"name": "whoami", "x": "+ACI-,+ACI-name+ACI-:+ACI-add"}}).encode()
    headers = [h for h in _post(narrow, body) if h[0] != header[0]] + [header]
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", headers, body)
    assert answer.status == 415
    assert answer.json()["error"] == "unsupported_media_type"
    assert echo.requests == []


async def test_a_utf8_charset_parameter_is_fine(keys: Any) -> None:
    sc, echo, narrow, _ = keys
    body = json.dumps(CALL_WHOAMI).encode()
    headers = [h for h in _post(narrow, body) if h[0] != "Content-Type"] + [
        ("Content-Type", 'application/json; charset="UTF-8"')]
    assert (await raw_request(sc.proxy_port, "POST", "/mcp", headers, body)).status == 200
    assert len(echo.requests) == 1


@pytest.mark.parametrize(("method", "body"), [
    ("POST", json.dumps(PING).encode()),  # the upstream answered another request's id on it
    ("GET", b"{}"),                       # a GET with a body is no less a stream
    ("DELETE", b""),
])
async def test_a_tool_list_on_any_answer_is_filtered(
        config: ConfigFactory, start_sidecar: SidecarStarter, method: str, body: bytes) -> None:
    def answer(_: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        return [("Content-Type", "application/json")], json.dumps(_list_answer(1000, _tools(20))).encode(), False

    async with recording_upstream(dribbling(answer)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        reply = await raw_request(sc.proxy_port, method, "/mcp", _post(key, body), body)
    assert [tool["name"] for tool in reply.json()["result"]["tools"]] == ["get_0000", "get_0010"]


@pytest.mark.parametrize("stream", [
    # A byte-order mark opens the stream: a client ignores it, and so must the filter.
    b"\xef\xbb\xbfdata: " + json.dumps(_list_answer(1, _tools(20))).encode() + b"\n\n",
    # The member's name spelled with an escape.
    b"data: " + json.dumps(_list_answer(1, _tools(20))).encode().replace(b'"tools"', b'"\\u0074ools"') + b"\n\n",
])
async def test_an_oddly_spelled_event_stream_is_still_filtered(
        config: ConfigFactory, start_sidecar: SidecarStarter, stream: bytes) -> None:
    def answer(_: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        return [("Content-Type", "text/event-stream")], stream, True

    async with recording_upstream(dribbling(answer, piece=50)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        reply = await raw_request(sc.proxy_port, "GET", "/mcp", _post(key, b""), wait=20)
    message = json.loads(reply.body.split(b"data: ", 1)[1])
    assert [tool["name"] for tool in message["result"]["tools"]] == ["get_0000", "get_0010"]


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_an_answer_that_may_hold_a_tool_list_but_cannot_be_read_is_not_sent(
        config: ConfigFactory, start_sidecar: SidecarStarter, content_type: str) -> None:
    unreadable = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add","n":' + b"9" * 5000 + b"}]}}"

    def answer(_: bytes) -> tuple[list[tuple[str, str]], bytes, bool]:
        if content_type == "text/event-stream":
            return [("Content-Type", content_type)], b"data: " + unreadable + b"\n\n", True
        return [("Content-Type", content_type)], unreadable, False

    async with recording_upstream(dribbling(answer)) as upstream:
        sc = await start_sidecar(_policy_settings(config, upstream.url))
        _, key = await sc.create_key("getter", ["getters"])
        body = json.dumps(PING).encode()
        received = await exchange(sc.proxy_port, [
            f"POST /mcp HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body], wait=10)
    assert b"add" not in received
    if content_type == "application/json":
        assert parse_responses(received)[0].status == 502


async def test_routing_headers_over_a_body_that_cannot_be_read_are_refused_for_any_key(keys: Any) -> None:
    # A server keeping the last copy of "jsonrpc" runs this; the log must not name the header's tool.
    sc, echo, _, open_key = keys
    body = b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"add"}}'
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(
        open_key, body, ("Mcp-Method", "tools/call"), ("Mcp-Name", "whoami")), body)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == -32020
    assert echo.requests == []
    # Without routing headers it is the server's to answer, and the log names nothing it did not read.
    assert (await raw_request(sc.proxy_port, "POST", "/mcp", _post(open_key, body), body)).status == 200
    access = [line for line in sc.log_lines() if line.get("type") == "access"]
    assert access[-1]["mcp_method"] is None
    assert access[-1]["mcp_name"] is None


async def test_routing_headers_are_checked_on_large_chunked_bodies_too(keys: Any) -> None:
    sc, echo, _, open_key = keys
    body = json.dumps({**CALL_ADD, "params": {"name": "add", "arguments": {"pad": "p" * 100_000}}}).encode()
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                      for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
    head = "".join(f"{k}: {v}\r\n" for k, v in _post(open_key, body, ("Mcp-Method", "tools/call"),
                                                        ("Mcp-Name", "whoami")))
    received = await exchange(sc.proxy_port, f"POST /mcp HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n"
                                             "Connection: close\r\n\r\n".encode() + chunks, wait=10)
    (answer,) = parse_responses(received)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == -32020
    assert echo.requests == []


@pytest.mark.parametrize("name", [
    "=?base64?d2hvYW1p\u00ff?=",  # not ASCII inside the base64 sentinel
    "=?base64?!!?=",
])
async def test_a_malformed_encoded_mcp_name_is_a_mismatch_not_a_crash(keys: Any, name: str) -> None:
    sc, _echo, _, open_key = keys
    body = json.dumps(CALL_WHOAMI).encode()
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(
        open_key, body, ("Mcp-Method", "tools/call"), ("Mcp-Name", name)), body)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == -32020
    encoded = "=?base64?" + base64.b64encode(b"whoami").decode() + "?="
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(
        open_key, body, ("Mcp-Method", "tools/call"), ("Mcp-Name", encoded)), body)
    assert answer.status == 200


async def test_ids_json_cannot_carry_never_make_an_answer_that_is_not_json(keys: Any) -> None:
    sc, echo, narrow, _ = keys
    nan = b'{"jsonrpc":"2.0","id":NaN,"method":"tools/call","params":{"name":"add"}}'
    assert (await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, nan), nan)).status == 400
    huge = b'{"jsonrpc":"2.0","id":1e999,"method":"tools/call","params":{"name":"add"}}'
    answer = await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, huge), huge)
    assert answer.status == 200
    assert answer.json()["id"] is None  # strict JSON: parsing it back would fail on Infinity
    assert echo.requests == []


async def test_a_batch_inside_a_batch_is_not_forwarded_for_a_policy_bound_key(keys: Any) -> None:
    sc, echo, narrow, _ = keys
    body = json.dumps([[CALL_ADD]]).encode()
    assert (await raw_request(sc.proxy_port, "POST", "/mcp", _post(narrow, body), body)).status == 400
    assert echo.requests == []


def _chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


@pytest.mark.parametrize("key_kind", ["narrow", "open"])
async def test_a_body_in_thousands_of_one_byte_chunks_is_refused(keys: Any, key_kind: str) -> None:
    # Each piece would cost a parser callback and an object: 3 MiB of 1-byte chunks cost ~270 MB.
    sc, _echo, narrow, open_key = keys
    body = json.dumps({**CALL_WHOAMI, "params": {"name": "whoami", "arguments": {"pad": "q" * 6000}}}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in _post(narrow if key_kind == "narrow" else open_key, body))
    received = await exchange(sc.proxy_port, f"POST /mcp HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n"
                                             "Connection: close\r\n\r\n".encode() + _chunked(body, 1), wait=15)
    assert parse_responses(received)[0].status == 400


async def test_a_body_in_some_small_chunks_arrives_whole(keys: Any) -> None:
    sc, _echo, narrow, _ = keys
    body = json.dumps({**CALL_WHOAMI, "params": {"name": "whoami", "arguments": {"pad": "r" * 3000}}}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in _post(narrow, body))
    received = await exchange(sc.proxy_port, f"POST /mcp HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n"
                                             "Connection: close\r\n\r\n".encode() + _chunked(body, 1), wait=15)
    (answer,) = parse_responses(received)
    assert answer.status == 200
    assert json.loads(answer.json()["body"]) == json.loads(body)
