"""The reference: a bare aiohttp pass-through proxy with no auth logic at all.

One pooled ClientSession, request and response bodies streamed, hop-by-hop headers dropped,
client disconnect cancels the upstream request (``handler_cancellation=True``). Whatever the
sidecar costs above this is ours; this much is the framework's.

Run: ``python -m bench.bare_proxy --port 8080 --upstream http://127.0.0.1:8000``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the client library sets itself.
_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _filter(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP)


async def forward(request: web.Request) -> web.StreamResponse:
    """Stream the request to the upstream and the answer back, chunk by chunk."""
    data = request.content.iter_any() if request.body_exists else None
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.rel_url.raw_path_qs,
        headers=_filter(request.headers),
        data=data,
        allow_redirects=False,
        auto_decompress=False,
    ) as up:
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=_filter(up.headers))
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=0)
    # Forward the client's headers as they are; do not add our own Accept-Encoding etc.
    skip = ("Accept-Encoding", "User-Agent")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=skip) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--upstream", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(
        app,
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
