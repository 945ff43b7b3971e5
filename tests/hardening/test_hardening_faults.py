"""Upstream faults (docs/reference/headers.md "Upstream failures"): unreachable -> 502, no response head in time ->
504, reset mid-stream -> the client's stream still ends cleanly, pool exhausted -> 503 after a
bounded wait. Afterwards the sidecar is healthy, and no error body carries identity header names
or values or the key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.keys.records import KeyRecord
from sidecar.proxy.handler import SMALL_BODY
from tests.support.attack import assert_no_secrets
from tests.support.config import hardening_settings
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.metrics import sample
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, closed_port, exchange, http_request, parse_responses
from tests.support.upstreams import (
    Behaviour,
    RecordingUpstream,
    UpstreamConnection,
    answer_ok,
    recording_upstream,
    sse_then_reset,
    stay_silent,
)

pytestmark = pytest.mark.timeout(60)

EVENTS = [f"id: {n}\ndata: {{\"n\": {n}}}\n\n".encode() for n in range(1, 4)]


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream() as up:
        yield up


@pytest.fixture
async def sidecar(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[RunningSidecar]:
    settings = hardening_settings(tmp_path, upstream.url, proxy={
        "upstream_timeout_seconds": 0.5,
    })
    async with running_sidecar(settings) as running:
        yield running


@pytest.fixture
async def credentials(sidecar: RunningSidecar) -> tuple[KeyRecord, str]:
    return await sidecar.create_key("fault-agent")


async def get(sidecar: RunningSidecar, key: str, path: str = "/mcp", wait: float = 5.0) -> bytes:
    request = http_request("GET", path, [("Authorization", f"Bearer {key}")])
    return await exchange(sidecar.proxy_port, request, wait=wait)


async def assert_still_healthy(sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    upstream.behaviour = answer_ok()
    [health] = parse_responses(await exchange(sidecar.proxy_port, http_request("GET", "/healthz")))
    assert health.status == 200
    [normal] = parse_responses(await get(sidecar, key, "/after-the-fault"))
    assert normal.status == 200
    assert normal.json() == {"ok": True}


def assert_clean_error(raw: bytes, status: int, record: KeyRecord, key: str) -> None:
    [response] = parse_responses(raw)
    assert response.status == status, raw[:300]
    assert response.fields["content-type"][0].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert_no_secrets(response.body, key, record.id, record.name, record.lookup_id)
    for name in response.fields:
        assert not name.startswith("x-toolio-"), name


async def test_unreachable_upstream_gets_502(tmp_path: Path) -> None:
    settings = hardening_settings(tmp_path, f"http://{LOOPBACK}:{closed_port()}")
    async with running_sidecar(settings) as sidecar:
        record, key = await sidecar.create_key("fault-agent")
        started = time.monotonic()
        raw = await get(sidecar, key)
        assert time.monotonic() - started < 3
        assert_clean_error(raw, 502, record, key)
        [health] = parse_responses(await exchange(sidecar.proxy_port, http_request("GET", "/healthz")))
        assert health.status == 200


async def test_silent_upstream_gets_504_after_the_upstream_timeout(
        sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    record, key = credentials
    upstream.behaviour = stay_silent
    started = time.monotonic()
    raw = await get(sidecar, key)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3, elapsed
    assert_clean_error(raw, 504, record, key)
    assert len(upstream.connections) == 1  # it did reach the upstream, which never answered
    await assert_still_healthy(sidecar, upstream, key)


@pytest.mark.parametrize("fault", ["close-without-answer", "garbage", "reset-before-head"])
async def test_upstream_that_breaks_before_its_response_head_gets_502(
        fault: str, sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    record, key = credentials

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        if fault == "garbage":
            conn.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await asyncio.sleep(0.05)
        if fault == "reset-before-head":
            conn.reset()
        else:
            conn.close()

    upstream.behaviour = behaviour
    assert_clean_error(await get(sidecar, key), 502, record, key)
    await assert_still_healthy(sidecar, upstream, key)


@pytest.mark.parametrize("start", [
    pytest.param(b"HTTP/1.1 200 ", id="reason-phrase"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: ", id="field-value"),
])
async def test_upstream_whose_response_head_never_ends_gets_502_not_a_wait_for_the_timeout(
        start: bytes, sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    record, key = credentials

    async def behaviour(conn: UpstreamConnection) -> None:
        # A megabyte of one reason phrase or field value: the sidecar gives up at its head bound
        # (64 KB), not at the upstream timeout (that would be a 504) and not out of memory.
        await conn.read_request()
        conn.write(start)
        for _ in range(256):
            if conn.transport.is_closing():
                break
            conn.write(b"A" * 4096)
            await asyncio.sleep(0)
        while await conn.reader.read(65536):
            pass

    upstream.behaviour = behaviour
    assert_clean_error(await get(sidecar, key), 502, record, key)
    await assert_still_healthy(sidecar, upstream, key)


async def test_upstream_reset_mid_stream_ends_the_clients_sse_stream_cleanly(
        sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    _, key = credentials
    upstream.behaviour = sse_then_reset(EVENTS)
    raw = await exchange(sidecar.proxy_port, http_request(
        "GET", "/mcp", [("Authorization", f"Bearer {key}"), ("Accept", "text/event-stream")]), wait=5)
    [response] = parse_responses(raw)
    assert response.status == 200
    assert response.fields["content-type"][0].startswith("text/event-stream")
    # Every event the upstream wrote arrives, and the chunked stream is terminated (0-size chunk):
    # the client sees the end of a stream, not a broken connection.
    assert response.complete, raw[-200:]
    assert response.body == b"".join(EVENTS)
    assert raw.endswith(b"0\r\n\r\n")
    await assert_still_healthy(sidecar, upstream, key)


@pytest.mark.parametrize("cut", ["reset", "close"])
async def test_upstream_cut_inside_a_chunked_non_sse_body_closes_the_client_connection_without_a_last_chunk(
        cut: str, sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    _, key = credentials

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\n{\"a\":\r\n")
        await asyncio.sleep(0.1)
        if cut == "reset":
            conn.reset()
        else:
            conn.close()

    upstream.behaviour = behaviour
    # A keep-alive request: closing the connection is the sidecar's own decision.
    request = http_request("GET", "/mcp", [("Authorization", f"Bearer {key}")], close=False)
    started = time.monotonic()
    raw = await exchange(sidecar.proxy_port, request, wait=3)
    assert time.monotonic() - started < 2  # closed, not left open after the partial body
    [response] = parse_responses(raw)
    assert response.status == 200
    assert response.fields["transfer-encoding"] == ["chunked"]
    # Unlike an event stream (whose events so far are whole), a cut JSON body ended with the
    # last-chunk would read as a complete, truncated answer: the client must see an incomplete
    # message instead (RFC 9112 8).
    assert response.body == b'{"a":'
    assert not response.complete, raw[-100:]
    assert not raw.endswith(b"0\r\n\r\n")
    await assert_still_healthy(sidecar, upstream, key)


def _sized_then_reset(length: int) -> Behaviour:
    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                   + str(length).encode() + b"\r\n\r\n" + b"{" + b" " * 99)
        await asyncio.sleep(0.1)
        conn.reset()
    return behaviour


async def test_upstream_reset_inside_a_large_sized_body_closes_the_client_connection_instead_of_lying(
        sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    _, key = credentials
    length = SMALL_BODY + 1000  # streamed: the head is already with the client when the reset comes
    upstream.behaviour = _sized_then_reset(length)
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/mcp", [("Authorization", f"Bearer {key}")]),
                         wait=5)
    [response] = parse_responses(raw)
    assert response.status == 200
    assert response.fields["content-length"] == [str(length)]
    assert not response.complete  # the client can tell the body was cut short
    await assert_still_healthy(sidecar, upstream, key)


async def test_upstream_reset_inside_a_small_sized_body_is_a_502_not_a_truncated_answer(
        sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    _, key = credentials
    upstream.behaviour = _sized_then_reset(1000)  # relayed in one piece, so nothing was sent yet
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/mcp", [("Authorization", f"Bearer {key}")]),
                         wait=5)
    [response] = parse_responses(raw)
    assert response.status == 502
    assert response.fields["content-type"][0].startswith("application/json")
    assert key.encode() not in raw
    await assert_still_healthy(sidecar, upstream, key)


async def test_exhausted_upstream_pool_gets_503_after_the_pool_timeout_then_recovers(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url, proxy={
        "upstream_timeout_seconds": 5, "upstream_max_connections": 1, "upstream_pool_timeout_seconds": 0.3})
    async with running_sidecar(settings) as sidecar:
        record, key = await sidecar.create_key("fault-agent")
        # A slow answer holds the only pooled connection (upstream_max_connections=1) ...
        upstream.behaviour = answer_ok(delay=1.0)
        slow = asyncio.ensure_future(get(sidecar, key, "/slow"))
        await eventually(lambda: b"GET /slow " in upstream.received)
        # ... so the next request waits upstream_pool_timeout_seconds for it, then gets 503.
        started = time.monotonic()
        raw = await get(sidecar, key, "/queued")
        waited = time.monotonic() - started
        assert_clean_error(raw, 503, record, key)
        assert 0.25 <= waited < 0.95, waited
        assert not slow.done()
        [slow_response] = parse_responses(await slow)
        assert slow_response.status == 200
        heads = [head.split(b"\r\n")[0] for head, _ in upstream.completed]
        assert heads == [b"GET /slow HTTP/1.1"]  # the refused request never reached the upstream
        await assert_still_healthy(sidecar, upstream, key)


async def test_faults_leave_no_upstream_request_or_stream_counted_as_open(
        sidecar: RunningSidecar, upstream: RecordingUpstream, credentials: tuple[KeyRecord, str]) -> None:
    _, key = credentials
    for behaviour in (stay_silent, sse_then_reset(EVENTS)):
        upstream.behaviour = behaviour
        await get(sidecar, key)
    assert len(sidecar.services.streams) == 0
    assert sample(sidecar.services.registry, "toolio_sidecar_open_streams") == 0
    await assert_still_healthy(sidecar, upstream, key)
