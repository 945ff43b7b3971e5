"""A trivial aiohttp upstream: the cheapest possible "MCP server" for proxy benchmarks.

- any method, any path: reads the request body and answers a fixed ~300 B JSON-RPC-like
  result (keep-alive);
- ``GET /sse``: an SSE stream that sends one event immediately, then stays open and silent
  until the client goes away (for time-to-first-event, idle-stream RSS and "is the upstream
  connection released when the client disconnects" checks).

Run: ``python -m bench.upstream --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

# A JSON-RPC 2.0 response shaped like a small tools/call result, padded to 300 bytes.
_RESULT = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {
        "content": [{"type": "text", "text": "The plan for week 48 has 12 open items; 3 are overdue."}],
        "structuredContent": {"week": 48, "open": 12, "overdue": 3, "owner": "planning"},
        "isError": False,
        "_meta": {"trace": ""},
    },
}


def _body(size: int = 300) -> bytes:
    raw = json.dumps(_RESULT, separators=(",", ":"))
    return raw.replace('"trace":""', '"trace":"' + "0" * max(0, size - len(raw)) + '"').encode()


BODY: bytes = _body()

SSE_FIRST_EVENT = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/ready"}\n\n'


async def answer(request: web.Request) -> web.Response:
    """Read the whole request body, return the fixed JSON body."""
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def sse(request: web.Request) -> web.StreamResponse:
    """Send one event at once, then hold the stream open without writing."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Tells nginx not to buffer this response (SSE through nginx).
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(SSE_FIRST_EVENT)
    # handler_cancellation=True below: a client disconnect cancels this sleep.
    await asyncio.sleep(3600)
    return resp


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        backlog=4096,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
