"""Call an MCP server behind toolio-sidecar with the official Python MCP SDK (docs/agent-developers.md).

The key goes in ``Authorization: Bearer`` on every request. The SDK reports any HTTP refusal as
``MCPError: Server returned an error response`` without its status, so a response hook logs the
sidecar's status and error code (``HTTP 401 invalid_token: ...``), which is what tells a wrong
key from a missing permission or an unreachable server. The key itself is never logged.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

log = logging.getLogger("toolio.client")


async def explain_refusal(response: httpx2.Response) -> None:
    """Log the sidecar's error for a refused request (docs/reference/status-codes.md)."""
    if response.status_code < 400:
        return
    await response.aread()
    try:
        error = response.json()
        detail = f"{error.get('error')}: {error.get('error_description') or error.get('message')}"
    except ValueError:
        detail = response.text[:200]
    log.warning("HTTP %s %s (%s %s)", response.status_code, detail, response.request.method, response.request.url.path)


async def call_whoami(url: str, key: str) -> dict[str, Any]:
    """Connect to ``url`` (e.g. https://mcp.example.com/mcp) with ``key`` and call ``whoami``."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30.0, read=300.0),
                           event_hooks={"response": [explain_refusal]}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        result = await client.call_tool("whoami", {})
    if result.structured_content is None:
        raise RuntimeError("whoami returned no structured content")
    return dict(result.structured_content)
