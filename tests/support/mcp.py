"""Speaking MCP in a test: a connected official client and what it saw on the wire. (The
example MCP server to talk to is ``tests.support.upstreams.example_upstream``.)

* :func:`mcp_client` yields a connected official ``mcp.Client`` whose every HTTP request
  (POSTs, the 2025-era GET stream, the closing DELETE) carries ``Authorization: Bearer <token>``.
* :class:`ProgressRecorder` is a ``progress_callback`` for ``Client.call_tool`` that timestamps
  each ``notifications/progress`` as it arrives.
* :class:`WireLog` records what the client actually sent and got back (method, MCP headers,
  status, content type), e.g. to check that a legacy session opened its GET stream and sent
  ``DELETE`` through the proxy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from demo.server import MCP_PATH

__all__ = [
    "MCP_PATH",
    "ProgressEvent",
    "ProgressRecorder",
    "TimedCall",
    "WireLog",
    "WireRecord",
    "call_tool_timed",
    "http_client",
    "mcp_client",
    "mcp_url",
    "tool_result_text",
]

# Request headers worth recording on the wire (lower-case).
_RECORDED_HEADERS = (
    "authorization",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
    "accept",
)


def mcp_url(base_url: str) -> str:
    """The MCP endpoint under a base URL: ``http://host:port`` -> ``http://host:port/mcp``."""
    return base_url.rstrip("/") + MCP_PATH


@dataclass(frozen=True, slots=True)
class WireRecord:
    kind: str  # "request" or "response"
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    content_type: str | None = None


@dataclass(slots=True)
class WireLog:
    """httpx2 event hooks that record every exchange of one client."""

    records: list[WireRecord] = field(default_factory=list)

    async def on_request(self, request: httpx2.Request) -> None:
        headers = {k: request.headers[k] for k in _RECORDED_HEADERS if k in request.headers}
        self.records.append(WireRecord("request", request.method, request.url.path, headers))

    async def on_response(self, response: httpx2.Response) -> None:
        headers = {
            k: response.headers[k] for k in ("mcp-session-id", "content-type") if k in response.headers
        }
        self.records.append(
            WireRecord(
                "response",
                response.request.method,
                response.request.url.path,
                headers,
                status=response.status_code,
                content_type=response.headers.get("content-type"),
            )
        )

    def requests(self, method: str | None = None) -> list[WireRecord]:
        return [r for r in self.records if r.kind == "request" and (method is None or r.method == method)]

    def responses(self, method: str | None = None) -> list[WireRecord]:
        return [r for r in self.records if r.kind == "response" and (method is None or r.method == method)]


def http_client(
    token: str | None,
    *,
    extra_headers: Mapping[str, str] | None = None,
    wire_log: WireLog | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` sending ``Authorization: Bearer <token>`` on every request.

    Same timeouts as the SDK's default client (30 s, 300 s read for SSE); ``trust_env=False``
    so a proxy from the environment never intercepts loopback traffic.
    """
    headers: dict[str, str] = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if extra_headers:
        headers.update(extra_headers)
    hooks: dict[str, list[Any]] = {}
    if wire_log is not None:
        hooks = {"request": [wire_log.on_request], "response": [wire_log.on_response]}
    return httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(30.0, read=300.0),
        trust_env=False,
        event_hooks=hooks,
    )


@asynccontextmanager
async def mcp_client(
    url: str,
    *,
    token: str | None,
    mode: str = "auto",
    extra_headers: dict[str, str] | None = None,
    wire_log: WireLog | None = None,
    read_timeout_seconds: float | None = 30.0,
) -> AsyncIterator[Client]:
    """A connected ``mcp.Client`` for the MCP endpoint ``url`` (e.g. ``mcp_url(base)``).

    ``mode="legacy"`` forces the 2025 initialize handshake (session id, GET stream, DELETE on
    exit); ``mode="auto"`` probes ``server/discover`` and speaks 2026-07-28 when the server
    answers it, else falls back to the handshake. ``token=None`` sends no Authorization.
    Connection failures surface from entering the context (as ``MCPError`` for HTTP errors).
    """
    async with (
        http_client(token, extra_headers=extra_headers, wire_log=wire_log) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            read_timeout_seconds=read_timeout_seconds,
        ) as client,
    ):
        yield client


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    at: float  # time.monotonic() when the callback ran
    progress: float
    total: float | None
    message: str | None


@dataclass(slots=True)
class ProgressRecorder:
    """``progress_callback`` for ``Client.call_tool``: records each progress notification."""

    events: list[ProgressEvent] = field(default_factory=list)

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append(ProgressEvent(time.monotonic(), progress, total, message))


@dataclass(frozen=True, slots=True)
class TimedCall:
    result: CallToolResult
    started: float
    finished: float
    progress: list[ProgressEvent]

    @property
    def first_progress_lead(self) -> float:
        """Seconds between the first progress notification and the call's return."""
        if not self.progress:
            raise AssertionError("no progress notification arrived")
        return self.finished - self.progress[0].at


async def call_tool_timed(client: Client, name: str, arguments: dict[str, Any] | None = None) -> TimedCall:
    """Call a tool, recording when each progress notification and the result arrived."""
    recorder = ProgressRecorder()
    started = time.monotonic()
    result = await client.call_tool(name, arguments or {}, progress_callback=recorder)
    finished = time.monotonic()
    return TimedCall(result, started, finished, list(recorder.events))


def tool_result_text(result: CallToolResult) -> str:
    """The concatenated text content of a tool result."""
    return "".join(getattr(block, "text", "") for block in result.content)
