"""The public listener's own HTTP/1.1 behaviour (``sidecar.http.server``), pinned over real sockets.

A real sidecar (``running_sidecar``; its ``PublicServer`` driven directly for drain) in front of a real
upstream on loopback TCP; nothing is mocked. Each test reads the bytes the client actually
receives and, where it matters, the bytes the upstream actually received:

* pipelining: requests in one packet are answered in order, each forwarded once;
* HTTP/1.0: ``Connection: close`` unless keep-alive was asked for, close-delimited streams;
* HEAD, 204 and 304: a head and nothing else, and the connection stays usable;
* ``Expect``: no ``100 Continue`` for a refused request, 417 for an unknown expectation;
* framing and size refusals (501, 414, 431, 400): a JSON answer, nothing forwarded, closed;
* ``Date``: added when the upstream sent none, the upstream's kept otherwise, never two;
* lingering close: a 413 reaches a client that is still sending;
* back-pressure both ways: multi-megabyte streams arrive intact and are not buffered whole;
* time: stray CRLFs do not stretch the head deadline;
* drain: ``PublicServer.stop_accepting`` closes idle connections, lets in-flight ones finish;
* review regressions, one test per fixed bug: answers a client never reads are not buffered
  without bound, more than 16 pipelined heads get a 400, a client leaving input behind an open
  stream still closes it upstream, the lingering close does not cut a slow reader, nothing is
  answered after a closing answer, trailers are bounded, drain survives a reset connection,
  requests before a malformed one are answered, every ``Expect`` line counts, other HTTP versions
  get 505, and control bytes in an upstream reason phrase never reach the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.http import server as listener_module
from sidecar.http.server import Listener
from sidecar.runtime.apps import SidecarApps
from sidecar.runtime.server import PublicServer
from sidecar.settings import Settings
from tests.support.config import hardening_settings
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.polling import eventually
from tests.support.raw import (
    LOOPBACK,
    RawResponse,
    closed_within,
    exchange,
    http_request,
    parse_fields,
    parse_responses,
)
from tests.support.upstreams import Behaviour, RecordingUpstream, UpstreamConnection, ok_response, recording_upstream

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Helpers: upstream behaviours, raw client reads, a bare public server


def _target(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("latin-1")


def _request_lines(upstream: RecordingUpstream) -> list[bytes]:
    return [head.split(b"\r\n", 1)[0] for head, _ in upstream.completed]


def answer_raw(respond: Callable[[bytes], bytes]) -> Behaviour:
    """Answer each request (keep-alive) with the raw bytes ``respond(request_head)`` gives; a
    request it cannot read (cut short, or a head over the reader's 64 KiB) ends the connection."""

    async def behaviour(conn: UpstreamConnection) -> None:
        while True:
            try:
                head = (await conn.read_request()).head
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                return
            conn.write(respond(head))

    return behaviour


def answer_in_turn(wait: Callable[[str], Awaitable[None]]) -> Behaviour:
    """200 JSON naming the target in ``X-Path``, each once ``wait(target)`` returns."""

    async def behaviour(conn: UpstreamConnection) -> None:
        while True:
            try:
                head = (await conn.read_request()).head
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                return
            await wait(_target(head))
            conn.write(ok_response(headers=[("X-Path", _target(head))]))

    return behaviour


def echo_path() -> Behaviour:
    """200 JSON for every request, naming the request target in ``X-Path``."""
    return answer_raw(lambda head: ok_response(headers=[("X-Path", _target(head))]))


def chunked(pieces: Sequence[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces if piece) + b"0\r\n\r\n"


def streamed_response(pieces: Sequence[bytes], content_type: str = "application/octet-stream") -> bytes:
    """A chunked 200 answer of unknown length (no Content-Length), as an upstream writes it."""
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked(pieces)


async def read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers from the sidecar
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False,
                        within: float = 5.0) -> RawResponse:
    """One complete response from ``reader``, framed as RFC 9112 6.3 says (``head_only`` for
    the answer to a HEAD); a body without framing is read to the end of the connection."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = parse_fields(head)
        if head_only or status < 200 or status in (204, 304):
            body = b""
        elif "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
            body = await read_chunked_body(reader)
        elif "content-length" in fields:
            body = await reader.readexactly(int(fields["content-length"][0]))
        else:
            body = await reader.read(-1)
    return RawResponse(status, fields, body, True, head)


async def received_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What arrives within ``seconds``: None if nothing (quiet and still open), b"" at EOF."""
    try:
        return await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return None


async def converse(port: int, data: bytes, *, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send ``data``; return everything read and whether the sidecar closed the connection
    (EOF or reset) within ``wait`` seconds."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    received = bytearray()
    closed = False
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1)
    return bytes(received), closed


SMALL_BUFFER = 64 * 1024


async def connect_with_small_buffers(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose own kernel buffers stay small (no autotuning), so that what is
    in transit between the two ends is mostly what the sidecar holds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


@asynccontextmanager
async def sidecar_for(tmp_path: Path, upstream: RecordingUpstream, **proxy: Any) -> AsyncIterator[RunningSidecar]:
    settings = hardening_settings(tmp_path, upstream.url, proxy={
        "header_timeout_seconds": 2, "keepalive_timeout_seconds": 30, **proxy})
    async with running_sidecar(settings) as sidecar:
        yield sidecar


@asynccontextmanager
async def public_server(settings: Settings) -> AsyncIterator[tuple[PublicServer, SidecarApps]]:
    """A running sidecar's public listener, for a test that drives its drain itself."""
    async with running_sidecar(settings) as sidecar:
        yield sidecar.public, sidecar.apps


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def assert_refused_as_json(raw: bytes, closed: bool, status: int, error: str) -> None:
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [status], raw[:300]
    [response] = responses
    assert response.complete
    assert response.fields["content-type"] == ["application/json"]
    assert response.json()["error"] == error
    assert response.fields.get("connection") == ["close"]
    assert closed, "the connection stayed open after the refusal"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream(echo_path()) as up:
        yield up


@pytest.fixture
async def sidecar(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[RunningSidecar]:
    async with sidecar_for(tmp_path, upstream) as running:
        yield running


@pytest.fixture
async def key(sidecar: RunningSidecar) -> str:
    _, full = await sidecar.create_key("listener")
    return full


# ---------------------------------------------------------------------------------------------
# Pipelining


async def test_pipelined_requests_in_one_packet_are_answered_in_order_and_each_forwarded_once(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    packet = (http_request("GET", "/one", bearer(key), close=False)
              + http_request("POST", "/two", bearer(key), b"second-body", close=False)
              + http_request("DELETE", "/three", bearer(key), close=False)
              + http_request("GET", "/four?x=1", bearer(key)))
    raw, closed = await converse(sidecar.proxy_port, packet)
    responses = parse_responses(raw)
    assert [(r.status, r.fields.get("x-path")) for r in responses] == [
        (200, ["/one"]), (200, ["/two"]), (200, ["/three"]), (200, ["/four?x=1"])]
    assert all(r.complete for r in responses)
    assert closed  # the last one asked for close
    assert _request_lines(upstream) == [b"GET /one HTTP/1.1", b"POST /two HTTP/1.1", b"DELETE /three HTTP/1.1",
                                        b"GET /four?x=1 HTTP/1.1"]
    assert [body for _, body in upstream.completed] == [b"", b"second-body", b"", b""]


async def test_pipelined_request_waits_for_the_slow_one_before_it(tmp_path: Path) -> None:
    # The first answer takes a while; the second (already in the socket) must neither overtake
    # it on the wire nor reach the upstream before the first is answered.
    async def wait(target: str) -> None:
        if target == "/slow":
            await asyncio.sleep(0.3)

    async with recording_upstream(answer_in_turn(wait)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("pipeline")
        packet = http_request("GET", "/slow", bearer(key), close=False) + http_request("GET", "/fast", bearer(key))
        raw, _ = await converse(sidecar.proxy_port, packet)
        assert [r.fields.get("x-path") for r in parse_responses(raw)] == [["/slow"], ["/fast"]]
        # One upstream connection carried both, one after the other: never two at once.
        assert [len(conn.completed) for conn in upstream.connections] == [2]


# ---------------------------------------------------------------------------------------------
# HTTP/1.0


async def test_http10_request_is_answered_with_connection_close_and_the_connection_closes(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port,
                                 f"GET /old HTTP/1.0\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    [response] = parse_responses(raw)
    assert response.status == 200
    assert response.fields.get("connection") == ["close"]
    assert response.body == b'{"ok":true}'
    assert closed
    assert _request_lines(upstream) == [b"GET /old HTTP/1.1"]


async def test_http10_keep_alive_is_kept_only_when_asked_for(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    try:
        writer.write(f"GET /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nAuthorization: Bearer {key}\r\n\r\n"
                     .encode())
        first = await read_response(reader)
        assert first.status == 200
        assert first.fields.get("connection") == ["keep-alive"]
        assert first.fields.get("content-length") == [str(len(first.body))]
        # Still open: a second request on it is served, and without keep-alive it is the last.
        writer.write(f"GET /b HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        second = await read_response(reader)
        assert (second.status, second.fields.get("connection")) == (200, ["close"])
        assert await closed_within(reader, 1.0)
    finally:
        writer.close()
    assert _request_lines(upstream) == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/event-stream"])
@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive-asked"])
async def test_http10_streamed_answer_of_unknown_length_is_close_delimited_not_chunked(
        content_type: str, keep_alive: bool, tmp_path: Path) -> None:
    pieces = [b"data: first\n\n", b"data: second\n\n", b"x" * 70_000, b"data: last\n\n"]
    async with recording_upstream(answer_raw(lambda _: streamed_response(pieces, content_type))) as upstream, \
            sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("old-client")
        ask = "Connection: keep-alive\r\n" if keep_alive else ""
        raw, closed = await converse(
            sidecar.proxy_port, f"GET /stream HTTP/1.0\r\nHost: x\r\n{ask}Authorization: Bearer {key}\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = parse_fields(head)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert "transfer-encoding" not in fields  # a 1.0 client cannot read chunked
    assert "content-length" not in fields
    assert fields.get("connection") == ["close"]  # even when keep-alive was asked for
    assert body == b"".join(pieces)  # raw bytes, no chunk framing
    assert closed  # the close is what ends the body


# ---------------------------------------------------------------------------------------------
# HEAD, 204, 304

_GET_BODY = b'{"resource":"' + b"r" * 5000 + b'"}'


def _head_aware(head: bytes) -> bytes:
    # As a server answers HEAD (RFC 9110 9.3.2): the GET head, Content-Length included, no body.
    response = ok_response(_GET_BODY, [("X-Path", _target(head))])
    return response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if head.startswith(b"HEAD ") else response


async def test_head_through_the_proxy_gets_the_head_only_and_the_connection_is_reused(tmp_path: Path) -> None:
    async with recording_upstream(answer_raw(_head_aware)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("head")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(http_request("HEAD", "/doc", bearer(key), close=False))
            head = await read_response(reader, head_only=True)
            assert head.status == 200
            assert head.fields.get("content-length") == [str(len(_GET_BODY))]  # what GET would send
            assert "connection" not in head.fields
            # No body bytes follow the head, and the connection stays open for the next request.
            assert await received_within(reader, 0.3) is None
            writer.write(http_request("GET", "/doc", bearer(key)))
            rest = await asyncio.wait_for(reader.read(-1), 5)
        finally:
            writer.close()
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]
    [get] = parse_responses(rest)
    assert get.body == _GET_BODY
    assert get.fields.get("x-path") == ["/doc"]
    assert _request_lines(upstream) == [b"HEAD /doc HTTP/1.1", b"GET /doc HTTP/1.1"]


async def test_head_on_the_sidecars_own_endpoint_has_the_get_length_and_no_body(
        sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    raw, _ = await converse(sidecar.proxy_port, http_request("HEAD", "/healthz", close=False)
                            + http_request("GET", "/healthz"))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    [get] = parse_responses(rest)  # right after the HEAD's head: no body bytes in between
    assert get.status == 200
    assert parse_fields(head)["content-length"] == [str(len(get.body))]
    assert upstream.received == b""


_NO_CONTENT = {
    "204-without-length": b"HTTP/1.1 204 No Content\r\nX-Path: /gone\r\n\r\n",
    "204-with-length-0": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Path: /gone\r\n\r\n",
    "304-with-etag": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Path: /gone\r\n\r\n',
}


@pytest.mark.parametrize("case", sorted(_NO_CONTENT))
async def test_204_and_304_from_upstream_have_no_body_and_no_content_length(case: str, tmp_path: Path) -> None:
    def respond(head: bytes) -> bytes:
        return _NO_CONTENT[case] if _target(head) == "/gone" else ok_response(headers=[("X-Path", _target(head))])

    async with recording_upstream(answer_raw(respond)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("no-content")
        raw, _ = await converse(sidecar.proxy_port, http_request("DELETE", "/gone", bearer(key), close=False)
                                + http_request("GET", "/next", bearer(key)))
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(case[:3])
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    fields = parse_fields(head)
    assert "content-length" not in fields
    assert "transfer-encoding" not in fields
    assert fields.get("x-path") == ["/gone"]
    # Nothing after the head but the next answer: the connection was reusable.
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]
    assert [r.fields.get("x-path") for r in parse_responses(rest)] == [["/next"]]
    assert len(upstream.completed) == 2


# ---------------------------------------------------------------------------------------------
# Expect


async def test_accepted_request_with_expect_100_continue_gets_100_before_it_sends_its_body(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # The control for the refusals below: the same head with a valid key does get invited.
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    try:
        writer.write(f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 4\r\n"
                     "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ping")
        response = await read_response(reader)
    finally:
        writer.close()
    assert response.status == 200
    [(head, body)] = upstream.completed
    assert body == b"ping"
    assert b"expect" not in head.lower()


@pytest.mark.parametrize(("case", "status"), [("no-key", 401), ("foreign-origin", 403), ("declared-too-large", 413)])
async def test_refused_request_with_expect_100_continue_gets_no_100_continue(
        case: str, status: int, tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with sidecar_for(tmp_path, upstream, max_body_bytes=1000,
                           allowed_origins=["https://app.example.com"]) as sidecar:
        _, key = await sidecar.create_key("expect")
        headers = {
            "no-key": "Content-Length: 10\r\n",
            "foreign-origin": f"Authorization: Bearer {key}\r\nOrigin: https://evil.example\r\nContent-Length: 10\r\n",
            "declared-too-large": f"Authorization: Bearer {key}\r\nContent-Length: 5000\r\n",
        }[case]
        # The body is never sent: a client that waits for 100 waits in vain, and gets the refusal.
        raw, _ = await converse(sidecar.proxy_port, f"POST /mcp HTTP/1.1\r\nHost: x\r\n{headers}"
                                "Expect: 100-continue\r\n\r\n".encode(), wait=1.5)
    assert b"100 Continue" not in raw
    assert b" 100 " not in raw.split(b"\r\n", 1)[0]
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [status], raw[:300]
    assert upstream.received == b""


async def test_refusal_before_an_expected_body_announces_that_the_connection_will_close(
        sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    # RFC 9110 10.1.1: a server that answers before reading the content SHOULD say whether it
    # will close the connection or go on reading. Whichever the listener does, the answer must
    # say it: "Connection: close" exactly when the connection is then closed.
    raw, closed = await converse(sidecar.proxy_port, b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                                 b"Expect: 100-continue\r\n\r\n", wait=1.5)
    [response] = parse_responses(raw)
    assert response.status == 401
    assert upstream.received == b""
    assert closed == (response.fields.get("connection") == ["close"]), (closed, response.head)


@pytest.mark.parametrize("expectation", ["something", "100-continue, other", "200-ok"])
async def test_unknown_expectation_gets_417_and_nothing_is_forwarded(
        expectation: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                                 f"Expect: {expectation}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    assert_refused_as_json(raw, closed, 417, "expectation_failed")
    assert upstream.received == b""


# ---------------------------------------------------------------------------------------------
# Framing and size refusals


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "x-custom , chunked"])
async def test_transfer_coding_before_chunked_gets_501_and_nothing_is_forwarded(
        coding: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, (
        f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: {coding}\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n").encode())
    assert_refused_as_json(raw, closed, 501, "not_implemented")
    assert upstream.received == b""


async def test_request_target_of_8190_bytes_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    target = "/t?" + "a" * (8190 - 3)
    raw, _ = await converse(sidecar.proxy_port, http_request("GET", target, bearer(key)))
    assert [r.status for r in parse_responses(raw)] == [200]
    assert _request_lines(upstream) == [f"GET {target} HTTP/1.1".encode()]


async def test_request_target_over_8190_bytes_gets_414_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, http_request("GET", "/t?" + "a" * 8188, bearer(key)))
    assert_refused_as_json(raw, closed, 414, "request_uri_too_long")
    assert upstream.received == b""


async def test_header_field_of_8190_bytes_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    value = "v" * (8190 - len("X-Big"))
    raw, _ = await converse(sidecar.proxy_port, http_request("GET", "/field", [*bearer(key), ("X-Big", value)]))
    assert [r.status for r in parse_responses(raw)] == [200]
    [(head, _)] = upstream.completed
    assert parse_fields(head)["x-big"] == [value]


async def test_single_header_field_over_8190_bytes_gets_431_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, http_request(
        "GET", "/field", [*bearer(key), ("X-Big", "v" * (8191 - len("X-Big")))]))
    assert_refused_as_json(raw, closed, 431, "request_header_fields_too_large")
    assert upstream.received == b""


def _with_fields(key: str, total: int) -> bytes:
    # Host, Authorization and Connection (from http_request) plus padding: ``total`` field lines.
    return http_request("GET", "/fields", [*bearer(key), *((f"X-F{n}", "1") for n in range(total - 3))])


async def test_128_header_fields_are_forwarded(sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, _ = await converse(sidecar.proxy_port, _with_fields(key, 128))
    assert [r.status for r in parse_responses(raw)] == [200]
    assert len(upstream.completed) == 1


async def test_more_than_128_header_fields_get_431_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, _with_fields(key, 129))
    assert_refused_as_json(raw, closed, 431, "request_header_fields_too_large")
    assert upstream.received == b""


def _big_head(key: str) -> bytes:
    # 100 fields of 700 bytes: each field and the field count are within their own limits, the
    # head as a whole (~70 KB) is not (64 KiB).
    request = http_request("GET", "/big-head", [*bearer(key), *((f"X-Pad-{n:03}", "p" * 690) for n in range(100))])
    assert 64 * 1024 < len(request) < 80 * 1024
    return request


async def test_head_over_64_kib_sent_in_small_pieces_gets_431_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    request = _big_head(key)
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    try:
        for start in range(0, len(request), 1024):
            with contextlib.suppress(ConnectionError):
                writer.write(request[start:start + 1024])
                await writer.drain()
            await asyncio.sleep(0.001)
        raw = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert_refused_as_json(raw, True, 431, "request_header_fields_too_large")
    assert upstream.received == b""


async def test_head_over_64_kib_in_one_packet_gets_431_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, _big_head(key))
    assert_refused_as_json(raw, closed, 431, "request_header_fields_too_large")
    assert upstream.received == b""


async def test_unfinished_head_over_64_kib_behind_a_request_in_the_same_read_gets_431_after_its_answer(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # The second head starts inside the read that ends the first request, and its one field never
    # ends: its bytes in that read count toward the head bound too.
    first = http_request("GET", "/healthz", [], close=False)
    second = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 120_000
    raw = await exchange(sidecar.proxy_port, [first + second, b"aaaa"], gap=0.3, wait=2.0)
    assert [r.status for r in parse_responses(raw)] == [200, 431]
    assert upstream.received == b""


@pytest.mark.parametrize(("first", "second"), [
    ("Content-Type: application/json", "Content-Type: text/plain"),
    ("Content-Type: application/json", "content-type: application/json"),
    ("Content-Location: /a", "Content-Location: /b"),
    ("Content-Range: bytes 0-1/2", "Content-Range: bytes 0-1/2"),
    ("Max-Forwards: 1", "Max-Forwards: 2"),
])
async def test_repeated_singleton_field_gets_400_and_nothing_is_forwarded(
        first: str, second: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, (
        f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{first}\r\nX-Between: 1\r\n{second}\r\n"
        "Content-Length: 2\r\n\r\n{}").encode())
    assert_refused_as_json(raw, closed, 400, "invalid_request")
    assert upstream.received == b""


# ---------------------------------------------------------------------------------------------
# Date

UPSTREAM_DATE = "Tue, 15 Nov 1994 08:12:31 GMT"


def _dates(response: RawResponse) -> list[str]:
    return response.fields.get("date", [])


def _assert_now(date: str) -> None:
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5, date


@pytest.mark.parametrize("shape", ["small", "streamed"])
async def test_date_is_added_to_an_upstream_answer_that_has_none(shape: str, tmp_path: Path) -> None:
    def respond(_: bytes) -> bytes:
        return ok_response() if shape == "small" else streamed_response([b"a" * 100, b"b" * 100])

    assert b"\r\ndate:" not in respond(b"GET /d HTTP/1.1\r\n\r\n").lower()
    async with recording_upstream(answer_raw(respond)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("date")
        raw, _ = await converse(sidecar.proxy_port, http_request("GET", "/d", bearer(key)))
    [response] = parse_responses(raw)
    assert response.status == 200
    [date] = _dates(response)
    _assert_now(date)


@pytest.mark.parametrize("spelling", ["Date", "date"])
@pytest.mark.parametrize("shape", ["small", "streamed"])
async def test_upstream_date_is_kept_and_not_doubled(spelling: str, shape: str, tmp_path: Path) -> None:
    def respond(_: bytes) -> bytes:
        response = ok_response() if shape == "small" else streamed_response([b"a" * 100])
        head, _, rest = response.partition(b"\r\n")
        return head + f"\r\n{spelling}: {UPSTREAM_DATE}".encode() + b"\r\n" + rest

    async with recording_upstream(answer_raw(respond)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("date")
        raw, _ = await converse(sidecar.proxy_port, http_request("GET", "/d", bearer(key)))
    [response] = parse_responses(raw)
    assert response.status == 200
    assert _dates(response) == [UPSTREAM_DATE]


async def test_sidecars_own_answers_and_refusals_carry_exactly_one_date(
        sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    for request in (http_request("GET", "/healthz"), http_request("GET", "/mcp"),
                    b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"):
        raw, _ = await converse(sidecar.proxy_port, request)
        [response] = parse_responses(raw)
        [date] = _dates(response)
        _assert_now(date)
    assert upstream.received == b""


# ---------------------------------------------------------------------------------------------
# Lingering close


async def test_413_for_an_oversized_chunked_body_reaches_a_client_that_keeps_sending(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with sidecar_for(tmp_path, upstream, max_body_bytes=1000) as sidecar:
        _, key = await sidecar.create_key("linger")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        piece = b"%x\r\n%b\r\n" % (32 * 1024, b"z" * 32 * 1024)
        sent = 0
        try:
            writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode() + piece)
            await writer.drain()
            await asyncio.sleep(0.2)  # the 413 is written now, and waits unread in this socket
            # Keep sending, still without reading. Closing with unread input makes the kernel send
            # a reset, which would destroy the waiting answer before it is read.
            until = time.monotonic() + 1.0
            while sent < 16 * MB and time.monotonic() < until:
                try:
                    writer.write(piece)
                    await asyncio.wait_for(writer.drain(), 0.5)
                except (ConnectionError, TimeoutError):
                    break
                sent += len(piece)
            response = await read_response(reader)
            assert await received_within(reader, 1.0) == b""  # then an orderly end (FIN)
        finally:
            writer.close()
    assert sent >= 16 * MB, sent  # the sidecar went on reading (and discarding) after its answer
    assert response.status == 413
    assert json.loads(response.body)["error"] == "body_too_large"
    assert response.fields.get("connection") == ["close"]
    assert upstream.completed == []


# ---------------------------------------------------------------------------------------------
# Back-pressure


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/event-stream"])
async def test_large_streamed_answer_read_slowly_arrives_complete_and_is_not_buffered_whole(
        content_type: str, tmp_path: Path) -> None:
    payload = random.Random(9112).randbytes(24 * MB)
    pieces = [payload[n:n + 60_000] for n in range(0, len(payload), 60_000)]
    response_bytes = streamed_response(pieces, content_type)

    async def behaviour(conn: UpstreamConnection) -> None:
        sock = conn.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        await conn.read_request()
        conn.write(response_bytes)  # all at once: what the socket does not take waits here
        await asyncio.sleep(60)

    async with recording_upstream(behaviour) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("big-answer")
        reader, writer = await connect_with_small_buffers(sidecar.proxy_port)
        try:
            writer.write(http_request("GET", "/big", bearer(key)))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in head.lower()
            # The client stalls: the sidecar must stop reading the upstream rather than take the
            # rest into memory, so most of the answer is still waiting at the upstream (without
            # back-pressure all of it would be gone from there within milliseconds).
            [conn] = upstream.connections
            for _ in range(2):
                await asyncio.sleep(0.3)
                in_transit = len(response_bytes) - conn.transport.get_write_buffer_size()
                assert in_transit < len(response_bytes) // 2, in_transit
            # Then it reads, slowly at first.
            body = bytearray()
            for _ in range(20):
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                await asyncio.sleep(0.005)
            body += await asyncio.wait_for(read_chunked_body(reader), 20)
        finally:
            writer.close()
    assert len(body) == len(payload)
    assert body == payload


def stall_until(release: asyncio.Event) -> Behaviour:
    """Read a request head, wait for ``release``, then read the (chunked) body and answer 200."""

    async def behaviour(conn: UpstreamConnection) -> None:
        seen = await conn.read_head()
        await release.wait()
        await conn.read_body(seen)
        conn.write(ok_response())
        await conn.drain()

    return behaviour


async def test_large_chunked_upload_is_forwarded_intact_at_the_upstreams_pace(tmp_path: Path) -> None:
    payload = random.Random(7230).randbytes(24 * MB)
    release = asyncio.Event()
    # A small receive buffer: what the upstream has not read waits on the sidecar's side, not
    # in this kernel.
    async with recording_upstream(stall_until(release), receive_buffer=SMALL_BUFFER) as upstream:
        settings = hardening_settings(tmp_path, upstream.url, proxy={"max_body_bytes": 64 * MB,
                                                                      "upstream_timeout_seconds": 20})
        async with running_sidecar(settings) as sidecar:
            _, key = await sidecar.create_key("big-upload")
            reader, writer = await connect_with_small_buffers(sidecar.proxy_port)
            try:
                request = (f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                           "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n"
                           "Connection: close\r\n\r\n").encode() + chunked(
                               [payload[n:n + 50_000] for n in range(0, len(payload), 50_000)])
                writer.write(request)  # all at once: what the socket does not take waits here
                # The upstream does not read yet: the sidecar must not swallow the body into
                # memory, so most of it is still waiting on the client's side.
                await eventually(lambda: bool(upstream.requests), within=5)
                for _ in range(2):
                    await asyncio.sleep(0.3)
                    in_transit = len(request) - writer.transport.get_write_buffer_size()
                    assert in_transit < len(payload) // 2, in_transit
                release.set()
                await asyncio.wait_for(writer.drain(), 20)
                response = await read_response(reader, within=20)
            finally:
                writer.close()
    assert response.status == 200
    [seen] = upstream.requests
    assert seen.head.startswith(b"POST /upload HTTP/1.1\r\n")
    assert b"transfer-encoding: chunked" in seen.head.lower()
    assert seen.complete
    assert len(seen.body) == len(payload)
    assert seen.body == payload


# ---------------------------------------------------------------------------------------------
# Time


async def _drip_crlf_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  seconds: float) -> float | None:
    """Send CRLF every 50 ms; return when the sidecar closed, seconds after the first one."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            writer.write(b"\r\n")
            await writer.drain()
        except ConnectionError:
            return time.monotonic() - started
        if await closed_within(reader, 0.05):
            return time.monotonic() - started
    return None


async def test_stray_crlfs_on_an_idle_kept_alive_connection_do_not_keep_it_open_past_the_head_timeout(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # A long keep-alive: only the head deadline, which the first stray byte starts, can close it.
    async with sidecar_for(tmp_path, upstream, header_timeout_seconds=0.5, keepalive_timeout_seconds=30) as sidecar:
        _, key = await sidecar.create_key("crlf")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(http_request("GET", "/first", bearer(key), close=False))
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(0.2)
            closed_after = await _drip_crlf_until_closed(reader, writer, 4.0)
        finally:
            writer.close()
    assert closed_after is not None, "stray CRLFs kept the connection open"
    assert 0.35 <= closed_after <= 1.5, closed_after
    assert _request_lines(upstream) == [b"GET /first HTTP/1.1"]


async def test_stray_crlfs_on_a_new_connection_do_not_keep_it_open_past_the_head_timeout(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with sidecar_for(tmp_path, upstream, header_timeout_seconds=0.5, keepalive_timeout_seconds=30) as sidecar:
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            closed_after = await _drip_crlf_until_closed(reader, writer, 4.0)
        finally:
            writer.close()
    assert closed_after is not None, "stray CRLFs kept the connection open"
    assert closed_after <= 1.5, closed_after
    assert upstream.received == b""


async def test_a_request_after_stray_crlfs_is_still_served(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # The other side of the rule: llhttp skips CRLFs between messages (RFC 9112 2.2 "SHOULD ignore
    # at least one empty line"), so they cost the client nothing but time.
    raw, _ = await converse(sidecar.proxy_port, http_request("GET", "/one", bearer(key), close=False) + b"\r\n\r\n"
                            + http_request("GET", "/two", bearer(key)))
    assert [r.fields.get("x-path") for r in parse_responses(raw)] == [["/one"], ["/two"]]


# ---------------------------------------------------------------------------------------------
# Drain


async def test_stop_accepting_closes_idle_connections_at_once_and_answers_the_in_flight_request(
        tmp_path: Path) -> None:
    release = asyncio.Event()

    async def wait(target: str) -> None:
        if target == "/slow":
            await release.wait()

    async with recording_upstream(answer_in_turn(wait)) as upstream:
        settings = hardening_settings(tmp_path, upstream.url, proxy={"header_timeout_seconds": 10,
                                                                      "keepalive_timeout_seconds": 30})
        async with public_server(settings) as (public, apps):
            _, key = await apps.services.keys.create(name="drain", roles=["viewer"], actor="test", client=None)
            port = public.port
            idle_reader, idle_writer = await asyncio.open_connection(LOOPBACK, port)
            busy_reader, busy_writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                idle_writer.write(http_request("GET", "/first", bearer(key), close=False))
                first = await read_response(idle_reader)
                assert (first.status, first.fields.get("connection")) == (200, None)  # kept alive
                busy_writer.write(http_request("GET", "/slow", bearer(key), close=False))
                await eventually(lambda: "/slow" in [_target(h) for h, _ in upstream.completed])

                public.stop_accepting()
                started = time.monotonic()
                assert await closed_within(idle_reader, 5.0)
                assert time.monotonic() - started < 3.0  # at once, not at a timeout (10 s and 30 s here)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(LOOPBACK, port)
                assert await received_within(busy_reader, 0.3) is None  # the in-flight one is left alone

                release.set()
                answer = await read_response(busy_reader)
                assert answer.status == 200
                assert answer.fields.get("x-path") == ["/slow"]
                assert answer.fields.get("connection") == ["close"]
                assert await closed_within(busy_reader, 1.0)
            finally:
                idle_writer.close()
                busy_writer.close()
    assert _request_lines(upstream) == [b"GET /first HTTP/1.1", b"GET /slow HTTP/1.1"]


# ---------------------------------------------------------------------------------------------
# Review regressions: one test per fixed listener bug, each failing with the fix reverted


def listener_of(public: PublicServer) -> Listener:
    """The running listener behind ``public``, whose connections a test may inspect."""
    listener = public._listener
    assert listener is not None
    return listener


_SIXTY_KB_ANSWER = b'{"data":"' + b"d" * 60_000 + b'"}'  # answered in one write (the proxy's small path)


async def test_client_that_pipelines_and_never_reads_does_not_make_the_sidecar_buffer_its_answers(
        tmp_path: Path) -> None:
    # For 2 s the client sends three requests every 20 ms and reads nothing: ~18 MB of answers
    # (60 KB each). The sidecar must stop answering (and reading) once its write buffer is full,
    # not go on forwarding requests and queueing their answers.
    def respond(head: bytes) -> bytes:
        return ok_response(_SIXTY_KB_ANSWER, [("X-Path", _target(head))])

    async with recording_upstream(answer_raw(respond)) as upstream:
        settings = hardening_settings(tmp_path, upstream.url, proxy={"header_timeout_seconds": 10,
                                                                      "keepalive_timeout_seconds": 30})
        async with public_server(settings) as (public, apps):
            _, key = await apps.services.keys.create(name="flood", roles=["viewer"], actor="test", client=None)
            # Each head carries padding, so that no single read holds more than 16 of them.
            padding = [(f"X-Pad-{n}", "p" * 8000) for n in range(4)]
            targets: list[str] = []
            peak = 0
            reader, writer = await connect_with_small_buffers(public.port)
            try:
                until = time.monotonic() + 2.0
                while time.monotonic() < until:
                    for _ in range(3):
                        targets.append(f"/r{len(targets)}")
                        writer.write(http_request("GET", targets[-1], [*bearer(key), *padding], close=False))
                    await asyncio.sleep(0.02)
                    for conn in listener_of(public).connections:
                        assert conn.transport is not None
                        peak = max(peak, conn.transport.get_write_buffer_size())
                    assert peak < MB, f"the sidecar buffered {peak} bytes of answers nobody reads"
                # Once the client reads, every request is answered, in order.
                answers = [await read_response(reader) for _ in targets]
            finally:
                writer.close()
    assert len(targets) > 150
    assert [(r.status, r.fields.get("x-path")) for r in answers] == [(200, [target]) for target in targets]
    assert all(r.body == _SIXTY_KB_ANSWER for r in answers)


async def test_more_than_16_requests_pipelined_ahead_of_their_answers_get_16_answers_then_400(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    targets = [f"/p{n}" for n in range(20)]
    packet = b"".join(http_request("GET", target, bearer(key), close=False) for target in targets)
    raw, closed = await converse(sidecar.proxy_port, packet)
    responses = parse_responses(raw)
    assert [(r.status, r.fields.get("x-path")) for r in responses[:-1]] == [(200, [t]) for t in targets[:16]]
    refusal = responses[-1]
    assert refusal.status == 400, raw[-300:]
    assert refusal.json()["error"] == "invalid_request"
    assert refusal.fields.get("connection") == ["close"]
    assert closed
    assert _request_lines(upstream) == [f"GET {t} HTTP/1.1".encode() for t in targets[:16]]


async def _sse_head_then_silence(conn: UpstreamConnection) -> None:
    await conn.read_request()
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    await asyncio.sleep(60)


@pytest.mark.parametrize("behind", ["pipelined-request", "garbage"])
async def test_client_leaving_with_input_behind_an_open_event_stream_closes_the_upstream_stream_at_once(
        behind: str, tmp_path: Path) -> None:
    async with recording_upstream(_sse_head_then_silence) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("sse")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(http_request("GET", "/sse", bearer(key), close=False))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert len(sidecar.services.streams) == 1
            writer.write(http_request("GET", "/next", bearer(key), close=False) if behind == "pipelined-request"
                         else b"GARBAGE\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # read by the sidecar, waiting behind the stream
        finally:
            writer.close()
        [conn] = upstream.connections
        await eventually(conn.reader.at_eof, what="the upstream stream outlived its client")
        await eventually(lambda: len(sidecar.services.streams) == 0)
    assert _request_lines(upstream) == [b"GET /sse HTTP/1.1"]  # the one behind it never went out


async def test_large_answer_to_a_connection_close_request_reaches_a_slow_reader_complete(tmp_path: Path) -> None:
    # A slow link, end to end: small kernel buffers on both sides (as a congested path leaves
    # them), so the answer's tail is still in the sidecar's own buffer when its handler ends and the
    # close begins. The client then pauses for longer than the linger (2 s). The linger must count
    # from when the answer is out, not from when it was handed to the transport, or it cuts the
    # answer short.
    payload = random.Random(6379).randbytes(3 * MB)
    response_bytes = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload)) + payload

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(response_bytes)
        await asyncio.sleep(60)

    async with recording_upstream(behaviour) as upstream:
        settings = hardening_settings(tmp_path, upstream.url)
        async with public_server(settings) as (public, apps):
            _, key = await apps.services.keys.create(name="slow", roles=["viewer"], actor="test", client=None)
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.setblocking(False)
            received = bytearray()
            left_in_sidecar = 0
            try:
                await loop.sock_connect(sock, (LOOPBACK, public.port))
                await eventually(lambda: len(listener_of(public).connections) == 1)
                [conn] = listener_of(public).connections
                assert conn.transport is not None
                conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                await loop.sock_sendall(sock, http_request("GET", "/big", bearer(key)))
                paused = False
                async with asyncio.timeout(10):
                    while data := await loop.sock_recv(sock, 65536):
                        received += data
                        if conn.closing and not paused:
                            left_in_sidecar = conn.transport.get_write_buffer_size()
                            paused = True
                            await asyncio.sleep(2.5)
            except ConnectionError:
                pass  # a reset: the answer was cut, which the length check below reports
            finally:
                sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert parse_fields(head).get("connection") == ["close"]
    assert left_in_sidecar > 0  # the pause did fall while the sidecar still held part of the answer
    assert len(body) == len(payload)
    assert body == payload


def _hello_world_slowly() -> Behaviour:
    """A chunked answer whose second half comes 0.5 s after its first."""

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n")
        await asyncio.sleep(0.5)
        conn.write(b"6\r\n world\r\n0\r\n\r\n")
        await asyncio.sleep(60)

    return behaviour


@pytest.mark.parametrize("arrival", ["same-packet", "while-answering"])
@pytest.mark.parametrize("kind", ["http10-close-delimited", "http11-connection-close"])
async def test_garbage_behind_a_closing_answer_never_gets_an_answer_of_its_own(
        kind: str, arrival: str, tmp_path: Path) -> None:
    async with recording_upstream(_hello_world_slowly()) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("closing")
        request = (f"GET /mcp HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
                   if kind == "http10-close-delimited" else http_request("GET", "/mcp", bearer(key)))
        garbage = b"GARBAGE\r\n\r\n"
        pieces = [request + garbage] if arrival == "same-packet" else [request, garbage]
        raw = await exchange(sidecar.proxy_port, pieces, gap=0.2, wait=3)
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    [response] = parse_responses(raw)
    assert response.status == 200
    assert response.fields.get("connection") == ["close"]
    assert response.body == b"hello world"  # for HTTP/1.0, all up to the close: nothing appended
    assert _request_lines(upstream) == [b"GET /mcp HTTP/1.1"]


async def test_endless_trailer_field_on_a_chunked_body_is_cut_off_with_an_answer(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # llhttp holds a trailer field whole until its line ends: without a bound of its own, the
    # sidecar would keep taking it (into memory) for as long as the client kept sending. Here 4 MB
    # of one unfinished trailer field must get an answer that ends the connection.
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    try:
        writer.write(f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Trailer: ".encode())
        blob = b"t" * 65536
        for _ in range(64):
            try:
                writer.write(blob)
                await asyncio.wait_for(writer.drain(), 1.0)
            except (ConnectionError, TimeoutError):
                break  # cut off while still sending: the answer, if any, is read below
        response = await read_response(reader, within=3)
        assert await closed_within(reader, 3.0)
    finally:
        writer.close()
    assert response.status in (400, 431), response.head
    assert response.json()["error"] in ("invalid_request", "request_header_fields_too_large")
    assert response.fields.get("connection") == ["close"]
    assert upstream.completed == []  # the body never counted as complete


async def test_drain_survives_a_client_that_just_reset_its_idle_connection(tmp_path: Path) -> None:
    async with recording_upstream(echo_path()) as upstream:
        settings = hardening_settings(tmp_path, upstream.url, proxy={"header_timeout_seconds": 10,
                                                                      "keepalive_timeout_seconds": 30})
        async with public_server(settings) as (public, _):
            loop = asyncio.get_running_loop()
            socks: list[socket.socket] = []
            try:
                for _ in range(3):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (LOOPBACK, public.port))
                    await loop.sock_sendall(sock, http_request("GET", "/healthz", close=False))
                    answer = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
                    assert answer.startswith(b"HTTP/1.1 200 ")  # then idle, kept alive
                assert len(listener_of(public).connections) == 3
                # One client resets its idle connection (SO_LINGER 0) just as the drain begins:
                # the sidecar has not yet seen it go when it closes its idle connections.
                gone = socks.pop(0)
                gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                gone.close()
                public.stop_accepting()
                for sock in socks:
                    assert await asyncio.wait_for(loop.sock_recv(sock, 65536), 1.0) == b""  # closed (FIN)
                    sock.close()
                # Each is gone from the listener once its client closed too, the reset one at once.
                await eventually(lambda: not listener_of(public).connections)
            finally:
                for sock in socks:
                    sock.close()
    assert upstream.received == b""


async def test_valid_pipelined_requests_before_a_malformed_one_in_the_same_packet_are_answered_first(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    packet = (http_request("GET", "/one", bearer(key), close=False)
              + http_request("POST", "/two", bearer(key), b"{}", close=False)
              + b"GET /bad HTTP/1.1\r\nHost: x\r\nHost: y\r\n" + f"Authorization: Bearer {key}\r\n\r\n".encode())
    raw, closed = await converse(sidecar.proxy_port, packet)
    responses = parse_responses(raw)
    assert [(r.status, r.fields.get("x-path")) for r in responses] == [(200, ["/one"]), (200, ["/two"]), (400, None)]
    assert responses[-1].json()["error"] == "invalid_request"
    assert closed
    assert _request_lines(upstream) == [b"GET /one HTTP/1.1", b"POST /two HTTP/1.1"]  # /bad never


@pytest.mark.parametrize("lines", [("100-continue", "something"), ("something", "100-continue")],
                         ids=["continue-first", "continue-last"])
async def test_an_unknown_expectation_on_a_second_expect_line_gets_417(
        lines: tuple[str, str], sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, (
        f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nExpect: {lines[0]}\r\n"
        f"Expect: {lines[1]}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
    assert_refused_as_json(raw, closed, 417, "expectation_failed")
    assert upstream.received == b""


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
async def test_request_line_with_a_version_other_than_1x_gets_505_and_nothing_is_forwarded(
        version: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw, closed = await converse(sidecar.proxy_port, (
        f"GET /mcp {version}\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n").encode())
    assert_refused_as_json(raw, closed, 505, "http_version_not_supported")
    assert upstream.received == b""


@pytest.mark.parametrize(("status", "reason", "standard"), [(200, "O\x01K", "OK"), (404, "Not\x7fFound", "Not Found")])
@pytest.mark.parametrize("shape", ["small", "streamed"])
async def test_upstream_reason_phrase_with_a_control_byte_reaches_the_client_as_the_standard_one(
        shape: str, status: int, reason: str, standard: str, tmp_path: Path) -> None:
    def respond(_: bytes) -> bytes:
        response = ok_response() if shape == "small" else streamed_response([b"a" * 100])
        return f"HTTP/1.1 {status} {reason}".encode("latin-1") + response[response.index(b"\r\n"):]

    async with recording_upstream(answer_raw(respond)) as upstream, sidecar_for(tmp_path, upstream) as sidecar:
        _, key = await sidecar.create_key("reason")
        raw, _ = await converse(sidecar.proxy_port, http_request("GET", "/r", bearer(key)))
    assert raw.split(b"\r\n", 1)[0] == f"HTTP/1.1 {status} {standard}".encode()
    [response] = parse_responses(raw)
    assert response.status == status
    assert response.complete


async def test_client_that_stops_reading_an_answer_on_a_kept_alive_connection_is_cut_after_the_send_stall_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_module, "SEND_STALL_SECONDS", 1.0)  # 30 s is too long to wait here
    response_bytes = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: %d\r\n\r\n" % (16 * MB)) + b"s" * (16 * MB)

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(response_bytes)
        await asyncio.sleep(60)

    async with recording_upstream(behaviour) as upstream:
        settings = hardening_settings(tmp_path, upstream.url, proxy={"header_timeout_seconds": 1,
                                                                      "keepalive_timeout_seconds": 1})
        async with public_server(settings) as (public, apps):
            _, key = await apps.services.keys.create(name="stall", roles=["viewer"], actor="test", client=None)
            reader, writer = await connect_with_small_buffers(public.port)
            try:
                writer.write(http_request("GET", "/big", bearer(key), close=False))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                # The client reads nothing more: after the stall bound (and a linger) the sidecar
                # must give up on it, and on its upstream stream.
                await eventually(lambda: not listener_of(public).connections)
                [conn] = upstream.connections
                await eventually(lambda: conn.transport.is_closing() or conn.reader.at_eof())
            finally:
                writer.close()
