"""Limits and slow clients (docs/reference/headers.md "Limits"), and session binding
(docs/reference/headers.md "Sessions").

* bodies over ``proxy.max_body_bytes`` get 413, also when streamed without a length: the
  sidecar counts while streaming and aborts the upstream request, which never sees the end;
* a foreign ``Origin`` gets 403; a key in the query string gets 400 and is never accepted;
* a request head not complete within ``proxy.header_timeout_seconds`` (slowloris, or a
  connection that sends nothing) is disconnected; idle keep-alive ends after
  ``proxy.keepalive_timeout_seconds``;
* an ``Mcp-Session-Id`` issued through the sidecar is bound to the key that opened it; the
  bindings are bounded (``session_binding_max``) and expire (``session_binding_ttl_seconds``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from tests.support.attack import assert_no_secrets
from tests.support.config import hardening_settings
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, closed_within, exchange, http_request, parse_fields, parse_responses
from tests.support.upstreams import RecordingUpstream, answer_ok, recording_upstream

pytestmark = pytest.mark.timeout(60)

LIMIT = 1000
END = b"END-OF-BODY-MARKER"


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream() as up:
        yield up


@pytest.fixture
async def sidecar(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[RunningSidecar]:
    settings = hardening_settings(tmp_path, upstream.url, proxy={
        "max_body_bytes": LIMIT,
        "allowed_origins": ["https://app.example.com"],
        # A long keep-alive, so that only the head deadline can be what cuts a slow head.
        "header_timeout_seconds": 0.5,
        "keepalive_timeout_seconds": 30,
    })
    async with running_sidecar(settings) as running:
        yield running


@pytest.fixture
async def key(sidecar: RunningSidecar) -> str:
    _, full = await sidecar.create_key("limits")
    return full


def _chunked(head: bytes, pieces: Iterable[bytes]) -> list[bytes]:
    return [head, *(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces), b"0\r\n\r\n"]


# --- body size --------------------------------------------------------------------------------


async def test_body_at_the_limit_is_forwarded_whole(sidecar: RunningSidecar, upstream: RecordingUpstream,
                                                   key: str) -> None:
    body = b"x" * (LIMIT - len(END)) + END
    raw = await exchange(sidecar.proxy_port, http_request("POST", "/ok", [("Authorization", f"Bearer {key}")], body))
    assert [r.status for r in parse_responses(raw)] == [200]
    [(_, received)] = upstream.completed
    assert received == body


async def test_declared_body_over_the_limit_gets_413_and_nothing_is_forwarded(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    body = b"x" * LIMIT + END
    raw = await exchange(sidecar.proxy_port, http_request("POST", "/big", [("Authorization", f"Bearer {key}")], body))
    [response] = parse_responses(raw)
    assert response.status == 413
    assert response.json()["error"] == "body_too_large"
    assert response.fields.get("connection") == ["close"]  # the rest is not read, for 10 s or at all
    assert upstream.received == b""


@pytest.mark.parametrize("piece_gap", [0.0, 0.05])
async def test_chunked_body_over_the_limit_gets_413_and_the_upstream_request_is_aborted(
        piece_gap: float, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    head = (f"POST /stream HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    pieces = [b"a" * 300, b"b" * 300, b"c" * 300, b"d" * 300, b"e" * 300 + END]
    raw = await exchange(sidecar.proxy_port, _chunked(head, pieces), gap=piece_gap)
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [413], raw[:300]
    assert responses[0].json()["error"] == "body_too_large"
    assert responses[0].fields.get("connection") == ["close"]
    # Counted while streaming: the upstream may have seen the first pieces, never the end of the
    # body and never a complete request.
    assert END not in upstream.received
    assert b"e" * 300 not in upstream.received
    assert upstream.completed == []


async def test_sidecar_keeps_serving_after_oversized_bodies(sidecar: RunningSidecar, upstream: RecordingUpstream,
                                                            key: str) -> None:
    head = (f"POST /stream HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    for _ in range(3):
        await exchange(sidecar.proxy_port, _chunked(head, [b"z" * (LIMIT + 1)]), wait=2)
    raw = await exchange(sidecar.proxy_port,
                         http_request("POST", "/small", [("Authorization", f"Bearer {key}")], b"hi"))
    assert [r.status for r in parse_responses(raw)] == [200]
    assert [body for _, body in upstream.completed] == [b"hi"]


# --- Origin and query-string keys ---------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.com.evil.example",
                                    "http://app.example.com", "https://app.example.com:8443"])
async def test_foreign_origin_gets_403_and_nothing_is_forwarded(
        origin: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw = await exchange(sidecar.proxy_port, http_request(
        "POST", "/mcp", [("Authorization", f"Bearer {key}"), ("Origin", origin)], b"{}"))
    [response] = parse_responses(raw)
    assert response.status == 403
    assert upstream.received == b""
    assert_no_secrets(response.body, key)


async def test_allowed_origin_is_forwarded(sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw = await exchange(sidecar.proxy_port, http_request(
        "POST", "/mcp", [("Authorization", f"Bearer {key}"), ("Origin", "https://app.example.com")], b"{}"))
    assert [r.status for r in parse_responses(raw)] == [200]
    assert len(upstream.completed) == 1


@pytest.mark.parametrize("query", ["access_token={key}", "key={key}", "k=%74ak_{rest}", "access%5Ftoken=x",
                                   "a=1&access_token={key}"])
@pytest.mark.parametrize("with_header", [False, True])
async def test_key_in_the_query_string_gets_400_and_is_never_accepted_or_forwarded(
        query: str, with_header: bool, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    target = "/mcp?" + query.format(key=key, rest=key[4:])
    headers = [("Authorization", f"Bearer {key}")] if with_header else []
    raw = await exchange(sidecar.proxy_port, http_request("GET", target, headers))
    [response] = parse_responses(raw)
    assert response.status == 400
    assert response.json()["error"] == "invalid_request"
    assert upstream.received == b""
    assert_no_secrets(response.body, key)


# --- slow and idle clients ----------------------------------------------------------------------


async def test_slowloris_request_head_is_disconnected_after_the_header_timeout(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    head = http_request("GET", "/slow", [("Authorization", f"Bearer {key}")] + [(f"X-Pad-{i}", "y") for i in range(40)])
    started = time.monotonic()
    closed_at: float | None = None
    try:
        # One byte every 20 ms: the head would take ~20 s to finish; a deadline must cut it.
        for byte in head:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed_at = time.monotonic()
                break
            if reader.at_eof() or await closed_within(reader, 0.02):
                closed_at = time.monotonic()
                break
            if time.monotonic() - started > 5:
                break
    finally:
        writer.close()
    assert closed_at is not None, "the slow head was never cut off"
    assert 0.4 <= closed_at - started <= 2.0, closed_at - started
    assert upstream.received == b""


async def test_slow_second_request_head_on_a_kept_alive_connection_is_disconnected_too(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    try:
        writer.write(http_request("GET", "/first", [("Authorization", f"Bearer {key}")], close=False))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        await asyncio.wait_for(reader.readexactly(int(parse_fields(head)["content-length"][0])), 3)
        # The next head starts but never finishes: the deadline runs from its first byte.
        writer.write(b"GET /second HTTP/1.1\r\nHost: a\r\n")
        await writer.drain()
        started = time.monotonic()
        assert await closed_within(reader, 5.0)
        assert 0.4 <= time.monotonic() - started <= 2.0
    finally:
        writer.close()
    assert [h.split(b"\r\n")[0] for h, _ in upstream.completed] == [b"GET /first HTTP/1.1"]


async def test_connection_that_never_sends_anything_is_closed_after_the_header_timeout(sidecar: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
    started = time.monotonic()
    try:
        assert await closed_within(reader, 3.0)
    finally:
        writer.close()
    assert 0.4 <= time.monotonic() - started <= 2.0


async def test_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # A long head deadline, so that only keep-alive can be what closes the idle connection.
    settings = hardening_settings(tmp_path, upstream.url, proxy={"header_timeout_seconds": 30,
                                                                  "keepalive_timeout_seconds": 0.5})
    async with running_sidecar(settings) as sidecar:
        _, key = await sidecar.create_key("keepalive")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(http_request("GET", "/first", [("Authorization", f"Bearer {key}")], close=False))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readexactly(int(parse_fields(head)["content-length"][0])), 3)
            answered = time.monotonic()
            assert await closed_within(reader, 5.0)
            idle = time.monotonic() - answered
        finally:
            writer.close()
    assert 0.3 <= idle <= 2.5, idle


async def test_kept_alive_connection_serves_a_second_request_before_the_keepalive_timeout(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    first = http_request("GET", "/one", [("Authorization", f"Bearer {key}")], close=False)
    second = http_request("GET", "/two", [("Authorization", f"Bearer {key}")])
    raw = await exchange(sidecar.proxy_port, [first, second], gap=0.2)
    assert [r.status for r in parse_responses(raw)] == [200, 200]
    assert len(upstream.completed) == 2


# --- session binding ----------------------------------------------------------------------------


def issuing_sessions() -> RecordingUpstream:
    """An upstream that opens a new session for every request without one, like an MCP server
    answering ``initialize``, and echoes the id on later requests."""
    counter = itertools.count(1)

    def headers(head: bytes) -> list[tuple[str, str]]:
        existing = parse_fields(head).get("mcp-session-id")
        return [("Mcp-Session-Id", existing[0] if existing else f"session-{next(counter):04d}")]

    return RecordingUpstream(answer_ok(headers=headers))


@pytest.fixture
async def session_upstream() -> AsyncIterator[RecordingUpstream]:
    upstream = issuing_sessions()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


async def _call(sidecar: RunningSidecar, key: str, session: str | None = None, method: str = "POST") -> tuple[int, str]:
    headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
    if session is not None:
        headers.append(("Mcp-Session-Id", session))
    raw = await exchange(sidecar.proxy_port, http_request(method, "/mcp", headers, b"{}" if method == "POST" else b""))
    [response] = parse_responses(raw)
    return response.status, response.fields.get("mcp-session-id", [""])[0]


async def test_session_issued_through_the_sidecar_is_bound_to_the_key_that_opened_it(
        tmp_path: Path, session_upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, session_upstream.url)) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        status, session = await _call(sidecar, alice)
        assert (status, session) == (200, "session-0001")
        forwarded = len(session_upstream.completed)
        # Another key presenting Alice's session is refused and nothing is forwarded.
        for method in ("POST", "GET", "DELETE"):
            status, _ = await _call(sidecar, mallory, session, method)
            assert status == 403, method
        assert len(session_upstream.completed) == forwarded
        # The owner keeps using it.
        assert await _call(sidecar, alice, session) == (200, session)
        assert len(session_upstream.completed) == forwarded + 1


async def test_session_bindings_beyond_the_memory_bound_are_still_enforced_from_the_store(
        tmp_path: Path, session_upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, session_upstream.url, proxy={"session_binding_max": 3})
    async with running_sidecar(settings) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        sessions = [(await _call(sidecar, alice))[1] for _ in range(10)]
        assert len(set(sessions)) == 10
        forwarded = len(session_upstream.completed)
        # Memory holds the newest three; the store holds every binding, so an evicted one is
        # still Alice's and never becomes Mallory's.
        for session in sessions:
            assert (await _call(sidecar, mallory, session))[0] == 403
        assert len(session_upstream.completed) == forwarded
        assert await _call(sidecar, alice, sessions[0]) == (200, sessions[0])


async def test_session_bindings_unused_for_their_ttl_are_forgotten_and_never_forwarded(
        tmp_path: Path, session_upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, session_upstream.url, proxy={"session_binding_ttl_seconds": 1},
                                  auth={"last_used_flush_seconds": 0.2})
    async with running_sidecar(settings) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        _, session = await _call(sidecar, alice)
        assert (await _call(sidecar, mallory, session))[0] == 403
        forwarded = len(session_upstream.completed)

        async def pruned() -> bool:  # asked of the store: asking through the proxy counts as use
            return await sidecar.services.store.session_owner(session) is None

        await eventually(pruned, interval=0.1)
        # Forgotten, it is nobody's: the MCP transport's 404 for an unknown session, for both.
        assert (await _call(sidecar, mallory, session))[0] == 404
        assert (await _call(sidecar, alice, session))[0] == 404
        assert len(session_upstream.completed) == forwarded


async def test_small_body_that_stops_arriving_gets_408_and_the_connection_closes(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # The body is short and declared, so it is read whole before forwarding; a client that sends
    # part of it and goes silent is answered once the upstream deadline passes (RFC 9110 15.5.9).
    settings = hardening_settings(tmp_path, upstream.url, proxy={"upstream_timeout_seconds": 0.5,
                                                                  "keepalive_timeout_seconds": 30})
    async with running_sidecar(settings) as sidecar:
        _, key = await sidecar.create_key("slow-body")
        head = (f"POST /mcp HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
        started = time.monotonic()
        raw = await exchange(sidecar.proxy_port, head + b'{"partial"', wait=5.0)
        elapsed = time.monotonic() - started
    [response] = parse_responses(raw)
    assert response.status == 408
    assert response.json()["error"] == "request_timeout"
    assert response.fields.get("connection") == ["close"]
    assert elapsed < 3.0, elapsed
    assert upstream.received == b""
