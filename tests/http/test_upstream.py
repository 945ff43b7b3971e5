"""The upstream client (``sidecar.http.client.UpstreamPool``) against real TCP servers on loopback.

Most tests script a raw ``asyncio.start_server`` byte for byte (:class:`RecordingUpstream`), so that
framing, keep-alive and faults are exactly what the test says, and count the connections the
server accepted to tell reuse from reconnection. A few go through the whole sidecar, where the
behaviour only means something end to end (bytes of header fields from client to upstream and
back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import pytest

import sidecar.http.client
from sidecar.http.client import Disconnected, PoolExhausted, ResponseReset, Unreachable, UpstreamPool, UpstreamResponse
from sidecar.proxy.headers import request_head
from tests.support.config import hardening_settings
from tests.support.harness import running_sidecar
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, closed_port, exchange, http_request, parse_responses
from tests.support.upstreams import (
    Behaviour,
    RecordingUpstream,
    SeenRequest,
    UpstreamConnection,
    ok_response,
    recording_upstream,
)

pytestmark = pytest.mark.timeout(10)

# ---------------------------------------------------------------------------------------------
# Scripts for the recording upstream (one per connection; the connection closes when it returns)


def reply(body: bytes = b"ok", *, status: str = "200 OK", version: str = "HTTP/1.1",
          headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A response framed by Content-Length."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"{version} {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def answer_each(answer: Callable[[SeenRequest], bytes] = lambda request: reply(request.target.encode())) -> Behaviour:
    """Answer every request on the connection (by default with its target as the body), keep-alive."""

    async def script(peer: UpstreamConnection) -> None:
        while True:
            request = await peer.read_request()
            peer.write(answer(request))

    return script


async def silent(peer: UpstreamConnection) -> None:
    """Read the request, never answer, notice when the client closes."""
    await peer.read_request()
    await peer.until_client_closes()


# ---------------------------------------------------------------------------------------------
# Fixtures and client helpers


class Serve(Protocol):
    async def __call__(self, script: Behaviour) -> RecordingUpstream: ...


class MakePool(Protocol):
    def __call__(self, url: str, *, max_connections: int = 4, pool_timeout: float = 1.0,
                 connect_timeout: float = 1.0) -> UpstreamPool: ...


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RecordingUpstream] = []

    async def start(script: Behaviour) -> RecordingUpstream:
        server = RecordingUpstream(script)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
async def pools() -> AsyncIterator[MakePool]:
    made: list[UpstreamPool] = []

    def make(url: str, *, max_connections: int = 4, pool_timeout: float = 1.0,
             connect_timeout: float = 1.0) -> UpstreamPool:
        pool = UpstreamPool(url, max_connections=max_connections, pool_timeout=pool_timeout,
                            connect_timeout=connect_timeout)
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in made:
            await pool.close()


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body that is not in memory (what the proxy relays from a client)."""
    for part in parts:
        await asyncio.sleep(0)
        yield part


async def send(pool: UpstreamPool, method: str = "GET", target: str = "/", *,
               body: bytes | AsyncIterator[bytes] | None = None, length: int | None = None,
               head_timeout: float = 1.0) -> UpstreamResponse:
    """A request framed the way the proxy frames it: Content-Length for bytes and for a stream of
    known length, chunked for a stream without one, no framing field without a body."""
    if isinstance(body, bytes):
        length = len(body)
    if body is None:
        framing = ""
    elif length is None:
        framing = "Transfer-Encoding: chunked\r\n"
    else:
        framing = f"Content-Length: {length}\r\n"
    head = request_head(method, target, pool.authority, [], framing)
    return await pool.request(method, head, body, length, head_timeout)


async def fetch(pool: UpstreamPool, method: str = "GET", target: str = "/", *,
                body: bytes | AsyncIterator[bytes] | None = None, length: int | None = None,
                head_timeout: float = 1.0) -> tuple[int, bytes]:
    """``send``, read the whole body, hand the connection back."""
    response = await send(pool, method, target, body=body, length=length, head_timeout=head_timeout)
    try:
        return response.status, await response.read()
    finally:
        response.close()


# ---------------------------------------------------------------------------------------------
# Keep-alive (RFC 9112 9.3)


async def test_sequential_requests_reuse_one_keep_alive_connection(serve: Serve, pools: MakePool) -> None:
    server = await serve(answer_each())
    pool = pools(server.url)
    for target in ("/one", "/two", "/three"):
        assert await fetch(pool, target=target) == (200, target.encode())
        assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert server.accepted == 1
    assert server.targets() == [(0, "/one"), (0, "/two"), (0, "/three")]


@pytest.mark.parametrize(("version", "headers", "reused"), [
    # RFC 9112 9.3: "close" in the response's Connection field ends the connection after it.
    pytest.param("HTTP/1.1", (("Connection", "close"),), False, id="http/1.1-connection-close"),
    # RFC 9112 9.3: an HTTP/1.0 response is persistent only when it says keep-alive.
    pytest.param("HTTP/1.0", (), False, id="http/1.0"),
    pytest.param("HTTP/1.0", (("Connection", "keep-alive"),), True, id="http/1.0-keep-alive"),
])
async def test_a_connection_is_reused_only_when_the_response_allows_keep_alive(
        serve: Serve, pools: MakePool, version: str, headers: tuple[tuple[str, str], ...], reused: bool) -> None:
    # The server itself never closes: any new connection is the pool's own decision.
    server = await serve(answer_each(lambda request: reply(b"ok", version=version, headers=headers)))
    pool = pools(server.url)
    for _ in range(3):
        assert await fetch(pool) == (200, b"ok")
        assert pool.open_connections == (1 if reused else 0)
    assert server.accepted == (1 if reused else 3)


async def test_a_pooled_connection_the_upstream_closed_while_idle_is_not_used_again(
        serve: Serve, pools: MakePool) -> None:
    async def answer_then_close(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(reply(b"once"))
        await asyncio.sleep(0.05)  # then close while the connection sits in the pool

    server = await serve(answer_then_close)
    pool = pools(server.url)
    assert await fetch(pool) == (200, b"once")
    await eventually(lambda: pool.open_connections == 0)
    assert pool.idle_connections == 0
    assert await fetch(pool) == (200, b"once")
    assert server.accepted == 2


async def one_answer_then_fin(peer: UpstreamConnection) -> None:
    """A complete keep-alive answer (no ``Connection: close``), then the end of the connection:
    a server at its per-connection request limit. The FIN follows the answer in the same write."""
    await peer.read_request()
    await asyncio.sleep(0.01)
    peer.write(reply(b"ok"))
    # Returning closes the connection.


async def test_a_connection_the_upstream_ends_right_after_a_complete_answer_is_not_handed_to_a_waiting_post(
        serve: Serve, pools: MakePool) -> None:
    # With one slot, each POST waits for the previous one's connection. Handed over in the loop
    # iteration after the FIN was read but before connection_lost ran, a POST would be written into
    # a closing connection; not being replayable (RFC 9112 9.3.1), it would fail as Disconnected.
    server = await serve(one_answer_then_fin)
    pool = pools(server.url, max_connections=1, pool_timeout=2.0)
    results = await asyncio.gather(*(fetch(pool, "POST", f"/{n}", body=b"{}") for n in range(4)))
    assert results == [(200, b"ok")] * 4
    assert server.accepted == 4
    assert sorted(target for _, target in server.targets()) == ["/0", "/1", "/2", "/3"]


async def test_bytes_the_upstream_sends_on_an_idle_connection_close_it(serve: Serve, pools: MakePool) -> None:
    async def answer_then_chatter(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(reply(b"ok"))
        await asyncio.sleep(0.05)
        peer.write(reply(b"nobody asked"))  # no request is outstanding: framing is lost
        await peer.until_client_closes()

    server = await serve(answer_then_chatter)
    pool = pools(server.url)
    assert await fetch(pool) == (200, b"ok")
    assert pool.idle_connections == 1
    await eventually(lambda: pool.open_connections == 0)
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


@pytest.mark.parametrize("extra", [
    pytest.param(b"EXTRA", id="garbage"),
    pytest.param(reply(b"smuggled", status="404 Not Found", headers=(("X-Which", "second"),)),
                 id="a-second-response"),
])
async def test_bytes_after_a_complete_response_are_discarded_not_read_as_part_of_it(
        serve: Serve, pools: MakePool, extra: bytes) -> None:
    # RFC 9112 6.3: extra data after a complete response (say a Content-Length that undercounts)
    # MAY be discarded and MUST NOT be processed as a separate response. Sent in the same write
    # as the response, so it reaches the pool in the same read.
    async def overlong(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(reply(b"ok", headers=(("X-Which", "first"),)) + extra)
        await peer.until_client_closes()

    server = await serve(overlong)
    pool = pools(server.url)
    response = await send(pool)
    assert response.status == 200
    assert response.header("X-Which") == "first"
    assert await response.read() == b"ok"
    response.close()
    assert pool.open_connections == 0  # its framing can no longer be trusted
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


# ---------------------------------------------------------------------------------------------
# Response framing (RFC 9112 6.3) and interim responses


async def test_a_response_without_length_or_chunking_is_read_until_the_upstream_closes(
        serve: Serve, pools: MakePool) -> None:
    async def close_delimited(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await asyncio.sleep(0.05)
        peer.write(b"second part")
        await asyncio.sleep(0.05)
        # Returning closes the connection: RFC 9112 6.3 item 8, that close is the end of the body.

    server = await serve(close_delimited)
    pool = pools(server.url)
    response = await send(pool)
    assert response.content_length is None
    assert await response.read() == b"first part, second part"
    response.close()
    # A connection whose close delimited the body cannot be reused.
    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    assert await fetch(pool) == (200, b"first part, second part")
    assert server.accepted == 2


async def test_a_close_delimited_body_is_streamed_as_it_arrives(serve: Serve, pools: MakePool) -> None:
    release = asyncio.Event()

    async def close_delimited(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\n\r\nearly")
        await release.wait()
        peer.write(b" late")

    server = await serve(close_delimited)
    pool = pools(server.url)
    response = await send(pool)
    chunks = response.iter_chunks()
    assert await asyncio.wait_for(anext(chunks), 1.0) == b"early"  # not held back until the close
    release.set()
    assert [chunk async for chunk in chunks] == [b" late"]
    response.close()


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "separate-writes"])
async def test_interim_1xx_responses_before_the_final_one_are_skipped(
        serve: Serve, pools: MakePool, one_write: bool) -> None:
    # RFC 9110 15.2: a client MUST be able to parse one or more 1xx responses before the final one
    # (103 Early Hints, RFC 8297; 100 Continue even when not asked for).
    interim = [b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
               b"HTTP/1.1 100 Continue\r\n\r\n"]
    final = reply(b"final", headers=(("X-Final", "yes"),))

    async def with_hints(peer: UpstreamConnection) -> None:
        while True:
            await peer.read_request()
            if one_write:
                peer.write(b"".join(interim) + final)
                continue
            for part in (*interim, final):
                peer.write(part)
                await asyncio.sleep(0.02)

    server = await serve(with_hints)
    pool = pools(server.url)
    for _ in range(2):
        response = await send(pool)
        assert (response.status, response.reason) == (200, "OK")
        assert response.headers == [("Content-Length", "5"), ("X-Final", "yes")]  # not the hints' Link
        assert await response.read() == b"final"
        response.close()
    assert server.accepted == 1  # the exchange ended cleanly, so its connection was pooled


async def test_a_head_response_is_returned_without_waiting_for_a_body(serve: Serve, pools: MakePool) -> None:
    async def head_answer(peer: UpstreamConnection) -> None:
        while True:
            await peer.read_request()
            # RFC 9110 9.3.2: the Content-Length of a HEAD answer describes a body that is not sent.
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")

    server = await serve(head_answer)
    pool = pools(server.url)
    started = time.monotonic()
    response = await send(pool, "HEAD", head_timeout=5.0)
    assert response.status == 200
    assert response.content_length == 1000
    # Waiting for the 1000 bytes would never end: any bound well short of the test's timeout tells.
    assert await asyncio.wait_for(response.read(), 3.0) == b""
    assert time.monotonic() - started < 3.0
    response.close()
    # The parser cannot be told the request was HEAD, so the connection is not trusted again.
    assert pool.open_connections == 0
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)
    status, _ = await fetch(pool, "HEAD")
    assert status == 200
    assert server.accepted == 2


async def test_a_chunked_response_body_is_decoded_and_its_connection_reused(serve: Serve, pools: MakePool) -> None:
    async def chunked(peer: UpstreamConnection) -> None:
        while True:
            await peer.read_request()
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(0.02)
            # A chunk extension and a trailer section (RFC 9112 7.1.1, 7.1.2) are part of the framing.
            peer.write(b"6;name=value\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")

    server = await serve(chunked)
    pool = pools(server.url)
    assert await fetch(pool) == (200, b"hello world")
    response = await send(pool)
    assert response.content_length is None
    assert [chunk async for chunk in response.iter_chunks()] == [b"hello", b" world"]
    response.close()
    assert server.accepted == 1


async def test_a_response_whose_final_coding_is_not_chunked_is_read_until_the_upstream_closes(
        serve: Serve, pools: MakePool) -> None:
    # RFC 9112 6.3 item 4: with Transfer-Encoding present and chunked not the final coding, a
    # response's body ends when the connection closes. What looks like a chunked body is just its
    # (gzip-coded) bytes, last-chunk lookalike included; the sidecar does not decode codings.
    async def chunked_then_gzip(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        peer.write(b"0\r\n\r\nmore")
        await asyncio.sleep(0.05)
        # Returning closes the connection: the end of the body.

    server = await serve(chunked_then_gzip)
    pool = pools(server.url)
    response = await send(pool)
    assert await response.read() == b"5\r\nhello\r\n0\r\n\r\nmore"
    response.close()
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


async def test_a_response_whose_final_coding_is_chunked_is_read_as_chunked_and_its_connection_reused(
        serve: Serve, pools: MakePool) -> None:
    # RFC 9112 6.3 item 4: chunked as the final coding frames the body, whatever codings precede it.
    async def gzip_then_chunked(peer: UpstreamConnection) -> None:
        while True:
            await peer.read_request()
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    server = await serve(gzip_then_chunked)
    pool = pools(server.url)
    for _ in range(2):
        assert await fetch(pool) == (200, b"hello")
        assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert server.accepted == 1


# ---------------------------------------------------------------------------------------------
# SeenRequest bodies


async def test_a_streamed_body_without_a_length_is_sent_chunked(serve: Serve, pools: MakePool) -> None:
    server = await serve(answer_each())
    pool = pools(server.url)
    # The empty part must not become a zero-size chunk: that is the last-chunk (RFC 9112 7.1).
    assert await fetch(pool, "POST", "/up", body=stream(b"abc", b"", b"0123456789abcdefg")) == (200, b"/up")
    [request] = server.connections[0].requests
    assert b"\r\nTransfer-Encoding: chunked\r\n" in request.head
    assert b"content-length" not in request.head.lower()
    assert request.framed_body == b"3\r\nabc\r\n11\r\n0123456789abcdefg\r\n0\r\n\r\n"


async def test_a_streamed_body_with_a_known_length_is_sent_raw(serve: Serve, pools: MakePool) -> None:
    server = await serve(answer_each())
    pool = pools(server.url)
    assert await fetch(pool, "POST", "/up", body=stream(b"abc", b"defgh"), length=8) == (200, b"/up")
    [request] = server.connections[0].requests
    assert b"\r\nContent-Length: 8\r\n" in request.head
    assert request.body == b"abcdefgh"
    assert await fetch(pool, "POST", "/again", body=b"{}") == (200, b"/again")
    assert server.accepted == 1


async def test_a_streamed_body_shorter_than_its_length_aborts_the_upstream_request(
        serve: Serve, pools: MakePool) -> None:
    server = await serve(silent)
    pool = pools(server.url)
    with pytest.raises(ConnectionResetError):
        await send(pool, "POST", body=stream(b"abc"), length=10)
    # The upstream never sees a complete request: the connection goes before the 10th byte.
    assert pool.open_connections == 0
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)
    assert server.accepted == 1
    assert server.connections[0].completed == []


async def test_a_streamed_body_longer_than_its_length_is_never_sent_past_it(serve: Serve, pools: MakePool) -> None:
    # Bytes past the Content-Length would be read by the upstream as the next request on the
    # connection (RFC 9112 6.3, 11.2: request smuggling).
    server = await serve(answer_each())
    pool = pools(server.url)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: upstream\r\n\r\n"
    with pytest.raises(ConnectionResetError):
        await send(pool, "POST", "/declared", body=stream(b"{}", smuggled), length=2)
    assert pool.open_connections == 0
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)
    assert server.accepted == 1
    assert "/smuggled" not in [target for _, target in server.targets()]


# ---------------------------------------------------------------------------------------------
# A reused connection that the upstream closed (RFC 9112 9.3.1)


def close_on_second_request() -> Behaviour:
    """Connection 0 answers its first request, then reads the second one completely and closes
    without a byte of answer: exactly the keep-alive race, made deterministic. Later connections
    answer everything."""

    async def script(peer: UpstreamConnection) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(reply(b"first"))
            await peer.read_request()
            return
        await answer_each(lambda request: reply(b"fresh:" + request.body))(peer)

    return script


@pytest.mark.parametrize(("method", "body"), [
    pytest.param("GET", None, id="GET"),
    pytest.param("GET", b"q=1", id="GET-with-body"),
    pytest.param("PUT", b'{"v": 1}', id="PUT"),
])
async def test_an_idempotent_request_in_memory_is_retried_once_on_a_fresh_connection(
        serve: Serve, pools: MakePool, method: str, body: bytes | None) -> None:
    server = await serve(close_on_second_request())
    pool = pools(server.url)
    assert await fetch(pool, target="/first") == (200, b"first")
    assert await fetch(pool, method, "/again", body=body) == (200, b"fresh:" + (body or b""))
    assert server.accepted == 2
    assert server.targets() == [(0, "/first"), (0, "/again"), (1, "/again")]
    assert server.connections[1].requests[0].body == (body or b"")
    assert (pool.open_connections, pool.idle_connections) == (1, 1)


@pytest.mark.parametrize(("method", "body"), [
    # RFC 9112 9.3.1: a proxy MUST NOT automatically retry non-idempotent requests.
    pytest.param("POST", lambda: b'{"jsonrpc": "2.0"}', id="POST"),
    # A streamed body was consumed by the first attempt: it cannot be sent again.
    pytest.param("GET", lambda: stream(b"q=", b"1"), id="GET-with-streamed-body"),
])
async def test_a_request_that_cannot_be_replayed_is_not_retried(
        serve: Serve, pools: MakePool, method: str, body: Callable[[], bytes | AsyncIterator[bytes]]) -> None:
    server = await serve(close_on_second_request())
    pool = pools(server.url)
    assert await fetch(pool, target="/first") == (200, b"first")
    with pytest.raises(Disconnected):
        await send(pool, method, "/again", body=body(), length=3 if method == "GET" else None)
    assert server.accepted == 1
    assert server.targets() == [(0, "/first"), (0, "/again")]
    assert pool.open_connections == 0


async def test_a_first_use_connection_closed_before_an_answer_is_not_retried(
        serve: Serve, pools: MakePool) -> None:
    # The retry covers only the keep-alive race; on a new connection the failure is the upstream's.
    async def read_then_close(peer: UpstreamConnection) -> None:
        await peer.read_request()

    server = await serve(read_then_close)
    pool = pools(server.url)
    with pytest.raises(Disconnected):
        await send(pool, target="/once")
    assert server.accepted == 1
    assert pool.open_connections == 0


# ---------------------------------------------------------------------------------------------
# The pool's bound


def answer_when(release: asyncio.Event, slow_target: str = "/slow") -> Behaviour:
    """Answer every request; the one for ``slow_target`` only once ``release`` is set."""

    async def script(peer: UpstreamConnection) -> None:
        while True:
            request = await peer.read_request()
            if request.target == slow_target:
                await release.wait()
            peer.write(reply(request.target.encode()))

    return script


async def test_a_request_over_the_bound_waits_for_the_connection_in_use(serve: Serve, pools: MakePool) -> None:
    release = asyncio.Event()
    server = await serve(answer_when(release))
    pool = pools(server.url, max_connections=1, pool_timeout=2.0)
    slow = asyncio.create_task(fetch(pool, target="/slow"))
    await eventually(lambda: server.targets() == [(0, "/slow")])
    queued = asyncio.create_task(fetch(pool, target="/queued"))
    await asyncio.sleep(0.1)
    assert not queued.done()
    assert server.accepted == 1  # it waits: no second connection past the bound
    # What the pool gauges report (toolio_sidecar_upstream_connections / _pool_waiting).
    assert (pool.open_connections, pool.idle_connections, pool.waiting) == (1, 0, 1)
    release.set()
    assert await slow == (200, b"/slow")
    assert await queued == (200, b"/queued")
    assert server.accepted == 1
    assert (pool.open_connections, pool.idle_connections, pool.waiting) == (1, 1, 0)
    assert server.targets() == [(0, "/slow"), (0, "/queued")]


async def test_a_request_over_the_bound_gets_pool_exhausted_after_the_pool_timeout(
        serve: Serve, pools: MakePool) -> None:
    release = asyncio.Event()
    server = await serve(answer_when(release))
    pool = pools(server.url, max_connections=1, pool_timeout=0.1)
    slow = asyncio.create_task(fetch(pool, target="/slow"))
    await eventually(lambda: server.targets() == [(0, "/slow")])
    started = time.monotonic()
    with pytest.raises(PoolExhausted):
        await fetch(pool, target="/refused")
    assert 0.08 <= time.monotonic() - started < 0.9  # the pool timeout, not the 1 s connect timeout
    release.set()
    assert await slow == (200, b"/slow")
    assert await fetch(pool, target="/after") == (200, b"/after")
    assert server.targets() == [(0, "/slow"), (0, "/after")]  # the refused one never went out


async def test_a_connection_handed_over_just_as_the_pool_wait_expires_is_not_lost(
        serve: Serve, pools: MakePool) -> None:
    server = await serve(answer_each())
    pool = pools(server.url, max_connections=1, pool_timeout=0.0)
    first = await send(pool, target="/first")
    assert await first.read() == b"/first"
    # The hand-over and the expiry of a waiter land in the same loop iteration: asyncio.timeout(0)
    # schedules its expiry with call_soon, after this call_soon of the release. With a real
    # timeout this happens whenever the timer fires in the iteration the connection is freed.
    asyncio.get_running_loop().call_soon(first.close)
    with pytest.raises(PoolExhausted):
        await send(pool, target="/expired")
    # The connection went back to the pool: its slot is not leaked, the next request gets it.
    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert await fetch(pool, target="/next") == (200, b"/next")
    assert server.targets() == [(0, "/first"), (0, "/next")]


async def test_a_connection_that_closes_while_handed_to_a_waiter_is_not_used(
        serve: Serve, pools: MakePool) -> None:
    close_now = asyncio.Event()

    async def answer_then_close_on_signal(peer: UpstreamConnection) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(reply(b"first"))  # keep-alive framing, then an unannounced close
            await close_now.wait()
            return
        await answer_each()(peer)

    server = await serve(answer_then_close_on_signal)
    pool = pools(server.url, max_connections=1, pool_timeout=1.0)
    first = await send(pool, target="/first")
    assert await first.read() == b"first"
    waiting = asyncio.create_task(fetch(pool, target="/second", head_timeout=5.0))
    await asyncio.sleep(0)  # it now waits for the only connection
    # Release the connection in the loop iteration after the upstream's FIN was read but before
    # the transport reported the connection lost (connection_lost is a call_soon of the FIN's
    # read callback; this poll, re-queued each iteration, runs ahead of it): the waiter is handed
    # a connection that is closed by the time it wakes up.
    loop = asyncio.get_running_loop()
    conn = first._conn
    assert conn is not None
    transport = conn.transport
    assert transport is not None
    released = loop.create_future()

    def release_once_closing() -> None:
        if transport.is_closing():
            first.close()
            released.set_result(None)
        else:
            loop.call_soon(release_once_closing)

    loop.call_soon(release_once_closing)
    close_now.set()
    await asyncio.wait_for(released, 1.0)
    # It is answered on a new connection, not left waiting out its head timeout on a dead one.
    started = time.monotonic()
    assert await waiting == (200, b"/second")
    assert time.monotonic() - started < 2.5  # not after its 5 s head timeout
    assert server.accepted == 2


async def test_a_slot_freed_while_a_request_waits_is_not_also_taken_by_a_newcomer(
        serve: Serve, pools: MakePool) -> None:
    async def closing_first(peer: UpstreamConnection) -> None:
        while True:
            request = await peer.read_request()
            if request.target == "/closing":
                # RFC 9112 9.6: the pool closes this connection once the answer is read. The server
                # keeps its end open, so that the slot is freed exactly when the test says.
                peer.write(reply(b"bye", headers=(("Connection", "close"),)))
                await peer.until_client_closes()
                return
            peer.write(reply(request.target.encode()))

    server = await serve(closing_first)
    pool = pools(server.url, max_connections=1, pool_timeout=1.0)
    loop = asyncio.get_running_loop()
    peak = 0
    sampling = True

    def sample() -> None:
        # Once per loop iteration: the count a request would see when it looks for a slot.
        nonlocal peak
        peak = max(peak, pool.open_connections)
        if sampling:
            loop.call_soon(sample)

    loop.call_soon(sample)
    first = await send(pool, target="/closing")
    assert await first.read() == b"bye"
    waiting = asyncio.create_task(fetch(pool, target="/waiting"))
    await asyncio.sleep(0)  # it is queued for the only slot
    assert not waiting.done()
    # A new request whose first step is queued ahead of the waiter's wake-up, and the slot freed
    # in the same iteration: the freed slot belongs to the waiter, the newcomer must queue too.
    newcomer = asyncio.create_task(fetch(pool, target="/newcomer"))
    first.close()
    assert await waiting == (200, b"/waiting")
    assert await newcomer == (200, b"/newcomer")
    sampling = False
    assert peak == 1
    assert pool.open_connections == 1
    # The closed connection, then one for the waiter, which the newcomer reuses after it.
    assert server.accepted == 2
    assert server.targets() == [(0, "/closing"), (1, "/waiting"), (1, "/newcomer")]


async def test_closing_a_response_twice_hands_its_connection_back_once(serve: Serve, pools: MakePool) -> None:
    server = await serve(answer_each())
    pool = pools(server.url)
    response = await send(pool, target="/once")
    assert await response.read() == b"/once"
    response.close()
    response.close()  # e.g. a finally after an explicit close: harmless
    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    with pytest.raises(ResponseReset):
        await response.read()  # the connection may already carry another exchange
    # Pooled twice, one connection would be taken by two requests at once and their answers mixed.
    assert list(await asyncio.gather(fetch(pool, target="/a"), fetch(pool, target="/b"))) == [
        (200, b"/a"), (200, b"/b")]
    assert server.accepted == 2
    assert (pool.open_connections, pool.idle_connections) == (2, 2)


async def test_closing_the_pool_fails_a_request_waiting_for_a_connection_with_unreachable(
        serve: Serve, pools: MakePool) -> None:
    server = await serve(silent)
    pool = pools(server.url, max_connections=1, pool_timeout=5.0)
    holder = asyncio.create_task(send(pool, target="/hold", head_timeout=5.0))
    await eventually(lambda: server.targets() == [(0, "/hold")])
    waiting = asyncio.create_task(send(pool, target="/waiting"))
    await asyncio.sleep(0)
    assert not waiting.done()
    await pool.close()
    done, _ = await asyncio.wait({waiting}, timeout=1.0)
    assert waiting in done
    # An error, not a cancellation: a CancelledError would read, in the waiting task, as if that
    # task had been cancelled, and escape the proxy's UpstreamError handling (no 502).
    assert not waiting.cancelled()
    assert isinstance(waiting.exception(), Unreachable)
    holder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holder


@pytest.mark.parametrize("give_up", ["time-out", "cancel"])
async def test_requests_that_stop_waiting_for_a_connection_leave_the_queue(
        serve: Serve, pools: MakePool, give_up: str) -> None:
    release = asyncio.Event()
    server = await serve(answer_when(release))
    pool = pools(server.url, max_connections=1, pool_timeout=0.05 if give_up == "time-out" else 5.0)
    slow = asyncio.create_task(fetch(pool, target="/slow"))
    await eventually(lambda: server.targets() == [(0, "/slow")])
    waiting = [asyncio.create_task(fetch(pool, target="/refused")) for _ in range(5)]
    await asyncio.sleep(0)
    assert len(pool._waiters) == 5
    if give_up == "cancel":
        for task in waiting:
            task.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    expected = PoolExhausted if give_up == "time-out" else asyncio.CancelledError
    assert all(isinstance(outcome, expected) for outcome in outcomes), outcomes
    # Counted while the pool is still full, so that nothing else has taken them out: left behind,
    # dead waiters would pile up for as long as an overload lasts.
    left_behind = len(pool._waiters)
    release.set()
    assert await slow == (200, b"/slow")
    assert await fetch(pool, target="/after") == (200, b"/after")
    assert server.targets() == [(0, "/slow"), (0, "/after")]
    assert left_behind == 0


# ---------------------------------------------------------------------------------------------
# Failures before the head


async def test_a_refused_connection_raises_unreachable(pools: MakePool) -> None:
    pool = pools(f"http://{LOOPBACK}:{closed_port()}")
    with pytest.raises(Unreachable):
        await send(pool)
    assert pool.open_connections == 0


async def test_a_head_that_does_not_arrive_in_time_raises_timeout_and_closes_the_connection(
        serve: Serve, pools: MakePool) -> None:
    server = await serve(silent)
    pool = pools(server.url)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await send(pool, head_timeout=0.1)
    assert 0.08 <= time.monotonic() - started < 0.9  # the head timeout, not the 1 s connect timeout
    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


async def test_a_request_cancelled_while_waiting_for_its_head_closes_its_connection(
        serve: Serve, pools: MakePool) -> None:
    server = await serve(silent)
    pool = pools(server.url)
    task = asyncio.create_task(send(pool, target="/hang", head_timeout=5.0))
    await eventually(lambda: server.targets() == [(0, "/hang")])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: pool.open_connections == 0)
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


@pytest.mark.parametrize("reply_bytes", [
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok", id="two-lengths"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", id="unasked-101"),
])
async def test_an_invalid_response_head_raises_disconnected_and_closes_the_connection(
        serve: Serve, pools: MakePool, reply_bytes: bytes) -> None:
    async def invalid(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(reply_bytes)
        await peer.until_client_closes()

    server = await serve(invalid)
    pool = pools(server.url)
    with pytest.raises(Disconnected):
        await send(pool)
    assert pool.open_connections == 0
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


@pytest.mark.parametrize("start", [
    pytest.param(b"HTTP/1.1 200 ", id="reason-phrase"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: ", id="field-value"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-", id="field-name"),
])
async def test_a_response_head_that_never_ends_raises_disconnected_once_past_the_bound(
        serve: Serve, pools: MakePool, start: bytes) -> None:
    # llhttp keeps a reason phrase or a field that has not ended yet without a limit of its own,
    # and no callback sees it before it ends: only the bytes read can bound the head (64 KB, like
    # the request head bound). A megabyte is dripped in small writes, far past it.
    async def endless_head(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(start)
        with contextlib.suppress(ConnectionError):
            for _ in range(256):
                peer.write(b"A" * 4096)
                await peer.drain()
        await peer.until_client_closes()

    server = await serve(endless_head)
    pool = pools(server.url)
    started = time.monotonic()
    with pytest.raises(Disconnected):
        await send(pool, head_timeout=3.0)
    assert time.monotonic() - started < 1.0  # at the bound, not at the head timeout
    assert pool.open_connections == 0
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


async def test_a_complete_response_head_over_the_bound_is_refused_even_when_it_arrives_in_one_read(
        serve: Serve, pools: MakePool) -> None:
    # The same bound as for a head that never ends: whether the upstream's bytes arrive in one read
    # or several is up to TCP, and must not decide whether a 70 KB field reaches the client.
    async def large_head(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"A" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok")
        await peer.until_client_closes()

    server = await serve(large_head)
    pool = pools(server.url)
    with pytest.raises(Disconnected):
        await fetch(pool)
    assert pool.open_connections == 0


async def test_a_head_and_a_large_body_arriving_in_one_read_are_not_taken_for_a_large_head(
        serve: Serve, pools: MakePool) -> None:
    # The head bound counts bytes read before the head is complete; a body that came in the same
    # read as a small head is not part of it.
    body = bytes(range(256)) * 800  # 200 KB

    async def one_write(peer: UpstreamConnection) -> None:
        while True:
            await peer.read_request()
            peer.write(reply(body))

    server = await serve(one_write)
    pool = pools(server.url)
    for _ in range(2):
        assert await fetch(pool) == (200, body)
    assert server.accepted == 1


# ---------------------------------------------------------------------------------------------
# Bodies cut short, back-pressure


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("reader", ["read", "iter_chunks"])
async def test_a_body_cut_short_raises_response_reset_and_the_connection_is_not_reused(
        serve: Serve, pools: MakePool, framing: str, reader: str) -> None:
    async def cut(peer: UpstreamConnection) -> None:
        await peer.read_request()
        if framing == "content-length":
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        else:
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        await asyncio.sleep(0.05)
        # Returning closes the connection before the promised end: an incomplete message
        # (RFC 9112 6.3 item 5, section 8), never a complete short one.

    server = await serve(cut)
    pool = pools(server.url)
    response = await send(pool)
    got: list[bytes] = []
    with pytest.raises(ResponseReset):
        await consume(response, reader, got)
    if reader == "iter_chunks":
        assert b"".join(got) == b"0123456789"  # what did arrive was passed on before the error
    response.close()
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


async def consume(response: UpstreamResponse, reader: str, got: list[bytes]) -> None:
    """Read the body with ``read()`` or ``iter_chunks()``, collecting what arrives in ``got``."""
    if reader == "read":
        got.append(await response.read())
        return
    async for chunk in response.iter_chunks():
        got.append(chunk)


async def test_a_large_body_nobody_reads_is_not_buffered_without_bound(serve: Serve, pools: MakePool) -> None:
    total = 20 * 1024 * 1024
    block = b"x" * (64 * 1024)
    bound = 1024 * 1024

    async def firehose(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while peer.sent < total:
            peer.write(block)
            await peer.drain()
            peer.sent += len(block)
        await peer.until_client_closes()

    server = await serve(firehose)
    pool = pools(server.url)
    response = await send(pool)
    conn = response._conn
    assert conn is not None
    # Nobody reads: the pool stops reading the socket once its buffer is past the high-water mark.
    await eventually(lambda: conn.reading_paused)
    await asyncio.sleep(0.1)
    assert conn.reading_paused
    assert conn.buffered < bound, conn.buffered
    # And TCP flow control holds the upstream back (it stalls at a few MB of socket buffers).
    assert server.connections[0].sent < total
    # Reading catches up and gets every byte; nothing buffered at any step is past the bound.
    received = 0
    async for chunk in response.iter_chunks():
        assert len(chunk) < bound
        received += len(chunk)
    assert received == total
    assert server.connections[0].sent == total
    response.close()
    assert pool.idle_connections == 1


# ---------------------------------------------------------------------------------------------
# Idle expiry


async def test_expire_idle_closes_connections_idle_longer_than_idle_seconds(
        serve: Serve, pools: MakePool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sidecar.http.client, "IDLE_SECONDS", 0.1)

    async def answer_and_watch(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(reply(b"ok"))
        await peer.until_client_closes()

    server = await serve(answer_and_watch)
    pool = pools(server.url)
    assert await fetch(pool) == (200, b"ok")
    pool.expire_idle()
    assert pool.idle_connections == 1  # younger than IDLE_SECONDS: kept
    await asyncio.sleep(0.15)
    pool.expire_idle()
    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    await asyncio.wait_for(server.connections[0].client_closed.wait(), 1.0)


async def test_a_connection_idle_longer_than_idle_seconds_is_not_reused(
        serve: Serve, pools: MakePool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without waiting for housekeeping: the upstream's own keep-alive timeout may be near.
    monkeypatch.setattr(sidecar.http.client, "IDLE_SECONDS", 0.1)
    server = await serve(answer_each())
    pool = pools(server.url)
    assert await fetch(pool, target="/one") == (200, b"/one")
    await asyncio.sleep(0.15)
    assert await fetch(pool, target="/two") == (200, b"/two")
    assert server.targets() == [(0, "/one"), (1, "/two")]
    assert pool.open_connections == 1


# ---------------------------------------------------------------------------------------------
# Header bytes


async def test_response_header_values_keep_their_bytes(serve: Serve, pools: MakePool) -> None:
    async def non_ascii(peer: UpstreamConnection) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Utf8: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\n\r\n")

    server = await serve(non_ascii)
    pool = pools(server.url)
    response = await send(pool)
    response.close()
    values = {name: value.encode("utf-8", "surrogateescape") for name, value in response.headers}
    assert values["X-Utf8"] == b"caf\xc3\xa9"
    assert values["X-Latin1"] == b"caf\xe9"
    assert response.header("x-utf8") == "café"


def _sidecar_request(key: str, extra: bytes = b"") -> bytes:
    return (b"GET /mcp HTTP/1.1\r\nHost: sidecar.test\r\nAuthorization: Bearer " + key.encode()
            + b"\r\n" + extra + b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("value", [
    pytest.param(b"caf\xc3\xa9 \xe2\x9c\x93", id="utf-8"),
    pytest.param(b"caf\xe9", id="latin-1"),
])
async def test_non_ascii_response_header_bytes_reach_the_client_unchanged_through_the_sidecar(
        tmp_path: Path, value: bytes) -> None:
    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                   b"X-Note: " + value + b"\r\n\r\n{}")
        await asyncio.sleep(1)

    async with recording_upstream(behaviour) as upstream, \
            running_sidecar(hardening_settings(tmp_path, upstream.url)) as running:
        _, key = await running.create_key("bytes-agent")
        raw = await exchange(running.proxy_port, _sidecar_request(key))
        [response] = parse_responses(raw)
        assert response.status == 200
        assert b"\r\nX-Note: " + value + b"\r\n" in raw


@pytest.mark.parametrize("value", [
    pytest.param(b"caf\xc3\xa9 \xe2\x9c\x93", id="utf-8"),
    pytest.param(b"caf\xe9", id="latin-1"),
])
async def test_non_ascii_request_header_bytes_reach_the_upstream_unchanged_through_the_sidecar(
        tmp_path: Path, value: bytes) -> None:
    async with recording_upstream() as upstream, \
            running_sidecar(hardening_settings(tmp_path, upstream.url)) as running:
        _, key = await running.create_key("bytes-agent")
        raw = await exchange(running.proxy_port, _sidecar_request(key, b"X-Note: " + value + b"\r\n"))
        [response] = parse_responses(raw)
        assert response.status == 200
        [head] = upstream.request_heads()
        assert b"\r\nX-Note: " + value + b"\r\n" in head


async def test_the_sidecar_relays_sequential_requests_over_one_upstream_connection(tmp_path: Path) -> None:
    async with recording_upstream() as upstream, \
            running_sidecar(hardening_settings(tmp_path, upstream.url)) as running:
        _, key = await running.create_key("keep-alive-agent")
        for _ in range(3):
            [response] = parse_responses(await exchange(running.proxy_port, _sidecar_request(key)))
            assert response.status == 200
        assert len(upstream.connections) == 1
        assert len(upstream.completed) == 3


async def test_the_sidecar_answers_concurrent_posts_when_the_upstream_ends_each_connection_after_one_answer(
        tmp_path: Path) -> None:
    # End to end, the race of test_a_connection_the_upstream_ends_right_after_a_complete_answer_...:
    # a POST handed a connection whose FIN was already read would be a 502, not retried
    # (RFC 9112 9.3.1).
    async def answer_once_then_fin(conn: UpstreamConnection) -> None:
        await conn.read_request()
        await asyncio.sleep(0.01)
        conn.write(ok_response())
        # Returning closes the connection, right after a complete keep-alive answer.

    async with recording_upstream(answer_once_then_fin) as upstream, \
            running_sidecar(hardening_settings(tmp_path, upstream.url,
                                               proxy={"upstream_max_connections": 1})) as running:
        _, key = await running.create_key("fin-agent")
        request = http_request("POST", "/mcp", [("Authorization", f"Bearer {key}")], b"{}")
        raws = await asyncio.gather(*(exchange(running.proxy_port, request) for _ in range(4)))
        assert [[r.status for r in parse_responses(raw)] for raw in raws] == [[200]] * 4
        assert len(upstream.completed) == 4


# ---------------------------------------------------------------------------------------------
# An https upstream (RFC 9110 4.3.3: the server's certificate must match the host it was asked for)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_an_https_upstream_is_reached_over_verified_tls_and_its_connection_reused(tmp_path: Path) -> None:
    import ssl

    from aiohttp import web

    cert_path, key_path = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    peers: set[tuple[str, int]] = set()

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text=f"{request.method} {request.host}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    trusting = ssl.create_default_context(cafile=str(cert_path))
    pool = UpstreamPool(f"https://localhost:{port}", max_connections=2, pool_timeout=1.0, connect_timeout=2.0,
                        ssl_context=trusting)
    untrusting = UpstreamPool(f"https://localhost:{port}", max_connections=2, pool_timeout=1.0,
                              connect_timeout=2.0)
    try:
        for _ in range(3):
            assert await fetch(pool, "GET", "/x") == (200, f"GET localhost:{port}".encode())
        assert len(peers) == 1  # one TLS connection, kept alive
        # The default context verifies against the system's CAs: a self-signed server is refused.
        with pytest.raises(Unreachable):
            await fetch(untrusting, "GET", "/x")
    finally:
        await pool.close()
        await untrusting.close()
        await runner.cleanup()
