"""The proxy's MCP step (docs/reference/tool-policy.md): the tool policy on requests, the
filtering of ``tools/list`` answers, and one activity record per ``tools/call``.

On the way in, :meth:`McpGate.inspect` reads the JSON-RPC body the handler already holds
(:mod:`sidecar.gate.jsonrpc`), compares the ``Mcp-Method`` / ``Mcp-Name`` headers with it, and
decides: forward, or answer here. A ``tools/call`` the key may not make is never forwarded: the
client gets the JSON-RPC error an MCP server gives for a tool it does not have (so the tool's
existence is not revealed), as JSON or as one server-sent event according to its ``Accept``; a
batch holding one is refused whole (403).

On the way out, every answer to a key with a tool policy passes :class:`AnswerFilter`, whole
JSON bodies or event by event, whatever the request was: an upstream routes answers by id, so a
``tools/list`` result can arrive on another request's answer (two requests with the ids ``1``
and ``"1"``) or on a GET stream replaying earlier events (``Last-Event-ID``). An answer that may
hold a tool list but cannot be read is not passed on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.errors import JsonRpcRefusal, ProxyError
from sidecar.gate import jsonrpc
from sidecar.gate.jsonrpc import TOOLS_CALL, McpMessage, Unreadable
from sidecar.gate.principal import PASSTHROUGH, Principal
from sidecar.gate.tools import ToolPolicy, Unfilterable, dumps, load_answer, may_hold_tools
from sidecar.http.sse import EventSplitter, EventTooLarge, event_data, with_data
from sidecar.metrics import Metrics

ALLOWED = "allowed"
DENIED = "denied"
# The largest answer (or single event) buffered to filter a tool list. Past it the answer is not
# sent rather than sent unfiltered.
MAX_FILTERED_BYTES = 32 * 1024 * 1024
# Tool names are at most 128 characters (MCP, tools: tool names); the audit keeps a little more
# of whatever a client sent, never an unbounded string.
MAX_LOGGED_NAME = 200
_JSON = "application/json"
_SSE = "text/event-stream"


class ToolCallRecorder(Protocol):
    """Where each ``tools/call`` decision goes (the activity audit); called on the hot path, so
    it must not wait for anything."""

    def tool_called(self, *, key_id: str, key_name: str, tool: str, outcome: str, client: str,
                    workspace: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer given here instead of the upstream's."""

    status: int
    fields: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Inspection:
    message: McpMessage | None
    answer: Answer | None = None
    # Set when the upstream's answer must go through the key's tool filter.
    filter: ToolPolicy | None = None

    @property
    def mcp_method(self) -> str | None:
        if self.message is None:
            return None
        methods = [call.method or "-" for call in self.message.calls[:8]]
        return ",".join(methods)

    @property
    def mcp_name(self) -> str | None:
        if self.message is None or self.message.batch:
            return None
        name = self.message.calls[0].name
        return name[:MAX_LOGGED_NAME] if name is not None else None


NOTHING = Inspection(None)


def _rpc_id(value: Any) -> Any:
    # JSON-RPC 2.0 4: an id is a string, a number or null; anything else is answered with null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def _media_ranges(accept: str) -> dict[str, float]:
    """Accept's media ranges and their weights (RFC 9110 12.5.1); parameters other than q ignored."""
    ranges: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if not media:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        ranges[media] = max(weight, ranges.get(media, 0.0))
    return ranges


def answers_as_events(accept: str | None) -> bool:
    """Whether a client wants this answer as a server-sent event rather than JSON: only when it
    accepts ``text/event-stream`` and not ``application/json`` (MCP Streamable HTTP clients
    accept both, and then the plain JSON answer is the simpler one)."""
    if accept is None:
        return False
    ranges = _media_ranges(accept)

    def weight(media: str) -> float:
        top = media.split("/")[0] + "/*"
        return ranges.get(media, ranges.get(top, ranges.get("*/*", 0.0)))

    return weight(_SSE) > 0 and weight(_JSON) <= 0


def _denied(principal: Principal, name: str | None) -> str:
    if name is None:
        return "Invalid params: the tool name must be a string"
    # The message an MCP server gives for a tool it does not have (MCP, tools: error handling).
    return f"Unknown tool: {name[:MAX_LOGGED_NAME]}"


class McpGate:
    def __init__(self, metrics: Metrics, recorder: ToolCallRecorder) -> None:
        self._metrics = metrics
        self._recorder = recorder

    def _record(self, principal: Principal, calls: Iterable[jsonrpc.McpCall], outcome: str, client: str) -> None:
        if principal.kind == PASSTHROUGH:
            return  # the upstream authenticates and authorizes these; the sidecar knows no caller
        counter = self._metrics.tool_call_outcomes[outcome]
        for call in calls:
            if call.method != TOOLS_CALL:
                continue
            counter.inc()
            self._recorder.tool_called(key_id=principal.key_id, key_name=principal.name,
                                       workspace=principal.workspace,
                                       tool=(call.name or "")[:MAX_LOGGED_NAME], outcome=outcome, client=client)

    def inspect(self, *, method: str, headers: Any, body: bytes | None, principal: Principal,
                client: str) -> Inspection:
        """What to do with a request whose body (if any) is ``body``. Raises the refusals
        (400 for a body a policy-bound key sends that cannot be read, or routing headers that
        cannot be checked against it or disagree with it; 415 for a body a policy-bound key
        sends in another media type or coding; 403 for a batch with a forbidden call)."""
        policy = principal.tools
        if body is None:
            # Nothing to read (a GET stream, a DELETE, a body streamed as it came).
            return Inspection(None, filter=policy) if policy is not None else NOTHING
        if policy is None and method != "POST":
            return NOTHING
        if policy is not None:
            _check_media_type(headers)
        routing = headers.getall("Mcp-Method", []), headers.getall("Mcp-Name", [])
        try:
            message = jsonrpc.parse(body)
        except Unreadable as exc:
            if policy is not None:
                # A key limited to some tools sends only what can be checked: a body read one way
                # here and another way upstream could carry any call.
                raise ProxyError(400, "invalid_request",
                                 f"The request body is not a readable JSON-RPC message: {exc}") from None
            if routing[0] or routing[1]:
                # Routing headers a server may act on, over a body they cannot be compared with.
                raise JsonRpcRefusal(400, jsonrpc.HEADER_MISMATCH,
                                     f"Mcp-Method / Mcp-Name cannot be checked: {exc}") from None
            return NOTHING
        mismatch = jsonrpc.header_mismatch(message, protocol_version=headers.get("MCP-Protocol-Version"),
                                           methods=routing[0], names=routing[1])
        if mismatch is not None:
            request_id = None if message.batch else _rpc_id(message.calls[0].id)
            raise JsonRpcRefusal(400, jsonrpc.HEADER_MISMATCH, mismatch, request_id)
        if policy is None:
            self._record(principal, message.calls, ALLOWED, client)
            return Inspection(message)
        forbidden = [call for call in message.calls if call.method == TOOLS_CALL
                     and (call.name is None or not policy.allows(call.name))]
        if forbidden:
            self._record(principal, message.calls, DENIED, client)
            if message.batch:
                raise ProxyError(403, "tool_forbidden", "The batch calls a tool this key may not call")
            call = forbidden[0]
            if not call.has_id:
                # A notification gets no answer (JSON-RPC 2.0 4.1): accepted, and dropped here.
                return Inspection(message, answer=Answer(202, [], b""))
            error = jsonrpc.error_message(_rpc_id(call.id), jsonrpc.INVALID_PARAMS, _denied(principal, call.name))
            return Inspection(message, answer=_rpc_answer(error, headers.get("Accept")))
        self._record(principal, message.calls, ALLOWED, client)
        return Inspection(message, filter=policy)


    def note_streamed(self, *, headers: Any, body: bytes, principal: Principal, client: str) -> Inspection:
        """Record the calls of a body that was streamed upstream as it arrived (a key without a
        tool policy, a body too large to hold): nothing left to refuse, only to record."""
        try:
            message = jsonrpc.parse(body)
        except Unreadable:
            return NOTHING
        self._record(principal, message.calls, ALLOWED, client)
        return Inspection(message)


def _check_media_type(headers: Any) -> None:
    """A policy-bound key's body is JSON in UTF-8 with no content coding: the only form in which
    it is certain to be read here as the server reads it (a server honouring another charset,
    UTF-7 say, would read other members out of the same bytes)."""
    content_type = headers.getall("Content-Type", [])
    if content_type:
        media, *params = content_type[0].split(";")
        media = media.strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise ProxyError(415, "unsupported_media_type", "A JSON-RPC body must be application/json")
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
                raise ProxyError(415, "unsupported_media_type", "A JSON-RPC body must be UTF-8")
    for coding in headers.getall("Content-Encoding", []):
        if coding.strip().lower() not in ("", "identity"):
            raise ProxyError(415, "unsupported_media_type", "A JSON-RPC body must not be content-coded")


def _rpc_answer(message: dict[str, Any], accept: str | None) -> Answer:
    data = dumps(message)
    if answers_as_events(accept):
        return Answer(200, [("Content-Type", _SSE), ("Cache-Control", "no-store")],
                      f"event: message\ndata: {data}\n\n".encode())
    return Answer(200, [("Content-Type", _JSON), ("Cache-Control", "no-store")], data.encode())


class AnswerFilter:
    """Filters one streamed event-stream answer, event by event; whole JSON bodies go through
    :meth:`ToolPolicy.filter_json`."""

    def __init__(self, policy: ToolPolicy, metrics: Metrics) -> None:
        self._policy = policy
        self._metrics = metrics
        self._splitter = EventSplitter(MAX_FILTERED_BYTES)
        self._started = False

    def json(self, body: bytes) -> bytes:
        """The body filtered; raises :class:`UnfilterableAnswer` when it cannot be."""
        try:
            filtered = self._policy.filter_json(body)
        except Unfilterable:
            raise UnfilterableAnswer() from None
        if filtered is not body:
            self._metrics.tool_lists_filtered.inc()
        return filtered

    def feed(self, chunk: bytes) -> bytes:
        """The complete events so far, filtered; raises :class:`UnfilterableAnswer` for an event
        too large to check or one that may hold a tool list but cannot be read."""
        if not self._started and chunk:
            self._started = True
            # HTML 9.2.5: one leading U+FEFF of the stream is ignored by clients; removed here so
            # that the first event reads here as it does there.
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")
        try:
            events = self._splitter.feed(chunk)
            if not events:
                return b""
            return b"".join(self._event(event) for event in events)
        except (EventTooLarge, Unfilterable):
            raise UnfilterableAnswer() from None

    def end(self) -> bytes:
        """The stream ended: an unfinished last event is dropped (a client discards it too,
        HTML 9.2.6: an event is dispatched only at a blank line)."""
        self._splitter.rest()
        return b""

    def _event(self, event: bytes) -> bytes:
        if not may_hold_tools(event):
            return event
        data = event_data(event)
        if data is None:
            if b"data" in event:
                raise Unfilterable("event data that is not UTF-8")
            return event
        message = load_answer(data)
        if not self._policy.filter_value(message):
            return event
        self._metrics.tool_lists_filtered.inc()
        return with_data(event, dumps(message))


class UnfilterableAnswer(Exception):
    """An answer that may hold a tool list is too large to check: it is not sent."""
