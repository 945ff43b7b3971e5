"""The official MCP SDK server with one small tool, for the "real server" benchmark.

Served by uvicorn in stateless JSON mode (``stateless_http=True, json_response=True``), so a
plain POST of ``mcp_request.json`` (a 2026-07-28 stateless ``tools/call``) returns 200 with a
JSON-RPC result. Run: ``python -m bench.mcp_server --port 8000``.
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server import MCPServer

server: MCPServer[object] = MCPServer("bench")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = server.streamable_http_app(
        stateless_http=True,
        json_response=True,
        host=args.host,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
