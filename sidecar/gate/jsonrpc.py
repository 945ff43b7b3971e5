"""Reading an MCP request's JSON-RPC body: which methods it calls, with which ids and tool names.

A body is read once, only when it is small and complete (the proxy hands over bytes it already
holds), and only as far as the policy needs: ``method``, ``id`` and the name-bearing parameter
(``params.name`` of ``tools/call`` and ``prompts/get``, ``params.uri`` of ``resources/read``).
A body is a single message or a JSON-RPC batch (JSON-RPC 2.0 section 6; MCP 2025-03-26).

Duplicate member names are refused (RFC 8259 4: names SHOULD be unique, and parsers disagree on
which copy wins): ``{"name": "allowed", "name": "other"}`` would otherwise be read as one tool
here and as another by an upstream whose parser keeps the first copy.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"
# MCP (2026-07-28) transports, "Routing headers": the parameter each method mirrors in Mcp-Name.
NAME_PARAMS: Mapping[str, str] = {TOOLS_CALL: "name", "prompts/get": "name", "resources/read": "uri"}
# The first protocol revision whose clients send Mcp-Method / Mcp-Name on every request.
ROUTING_HEADERS_SINCE = "2026-07-28"
# JSON-RPC error codes: -32602 invalid params (JSON-RPC 2.0 5.1); -32020 a routing header that
# disagrees with the body (MCP 2026-07-28, "Routing headers").
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020
_VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_BASE64_SENTINEL = re.compile(r"=\?base64\?(.*)\?=")


class Unreadable(ValueError):
    """The body is not a JSON-RPC message this sidecar can read (the reason says why)."""


@dataclass(frozen=True, slots=True)
class McpCall:
    """One message of the body. ``method`` is None for a response or a malformed element;
    ``has_id`` is False for a notification; ``name`` is the name-bearing parameter when it is a
    string (for ``tools/call``, the tool)."""

    method: str | None
    id: Any
    has_id: bool
    name: str | None
    name_present: bool  # the name-bearing parameter is present, whatever its type


@dataclass(frozen=True, slots=True)
class McpMessage:
    calls: tuple[McpCall, ...]
    batch: bool

    @property
    def methods(self) -> frozenset[str | None]:
        return frozenset(call.method for call in self.calls)


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise Unreadable(f"the member {name!r} appears twice in one object")
            seen.add(name)
    return result


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259 6), though Python's parser takes them.
    raise Unreadable(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _call(element: Any) -> McpCall:
    if not isinstance(element, dict):
        return McpCall(None, None, False, None, False)
    method = element.get("method")
    if not isinstance(method, str):
        method = None
    name: str | None = None
    name_present = False
    param = NAME_PARAMS.get(method) if method is not None else None
    if param is not None:
        params = element.get("params")
        if isinstance(params, dict) and param in params:
            name_present = True
            value = params[param]
            name = value if isinstance(value, str) else None
    return McpCall(method, element.get("id"), "id" in element, name, name_present)


def parse(body: bytes) -> McpMessage:
    """The messages of a JSON-RPC body; raises :class:`Unreadable` when it is not one."""
    try:
        text = body.decode("utf-8")
        value = _DECODER.decode(text)
    except Unreadable:
        raise
    except RecursionError:
        raise Unreadable("the JSON is nested too deeply") from None
    except ValueError:  # also UnicodeDecodeError
        raise Unreadable("the body is not UTF-8 JSON") from None
    if isinstance(value, list):
        if not value:
            raise Unreadable("an empty JSON-RPC batch")
        if any(isinstance(element, list) for element in value):
            raise Unreadable("a batch inside a batch")
        return McpMessage(tuple(_call(element) for element in value), True)
    if not isinstance(value, dict):
        raise Unreadable("the body is not a JSON-RPC message")
    return McpMessage((_call(value),), False)


def _decode_header(value: str) -> str | None:
    """An ``Mcp-Name`` value, with the ``=?base64?...?=`` form of non-ASCII names decoded
    (MCP 2026-07-28, "Routing headers"); None for a malformed one, which matches nothing."""
    match = _BASE64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group(1)
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None  # only the canonical encoding, as a conforming client sends it
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError: a payload that is not ASCII
        return None


def header_mismatch(message: McpMessage, *, protocol_version: str | None, methods: list[str],
                    names: list[str]) -> str | None:
    """Why the ``Mcp-Method`` / ``Mcp-Name`` headers disagree with the body, or None.

    ``methods`` and ``names`` are every copy of each header. Clients of 2026-07-28 and later
    send both on every request, and a server routes on them, so an intermediary compares them
    with the body instead of trusting either alone; an earlier client does not send them, but
    one it does send must agree too."""
    if len(methods) > 1:
        return "Mcp-Method appears more than once"
    if len(names) > 1:
        return "Mcp-Name appears more than once"
    modern = (protocol_version is not None and _VERSION.fullmatch(protocol_version) is not None
              and protocol_version >= ROUTING_HEADERS_SINCE)
    header_method = methods[0] if methods else None
    header_name = names[0] if names else None
    if message.batch:
        if header_method is not None or header_name is not None:
            return "Mcp-Method and Mcp-Name describe one message, not a batch"
        return None
    call = message.calls[0]
    if header_method is None:
        if modern and call.method is not None:
            return "Mcp-Method is missing"
    elif header_method != call.method:
        return "Mcp-Method does not match the body's method"
    param = NAME_PARAMS.get(call.method) if call.method is not None else None
    if param is None:
        if header_name is not None:
            return "Mcp-Name is sent for a method that names nothing"
        return None
    if header_name is None:
        if modern and call.name_present:
            return "Mcp-Name is missing"
        return None
    if not call.name_present or call.name is None or _decode_header(header_name) != call.name:
        return f"Mcp-Name does not match the body's {param}"
    return None


def error_message(request_id: Any, code: int, message: str) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response (section 5.1)."""
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
