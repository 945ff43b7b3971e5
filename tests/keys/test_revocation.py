"""Disable means now, enable means at once: the edges between authentication and forwarding."""

from __future__ import annotations

import asyncio
import json

from tests.support.harness import RunningSidecar, bearer, client_session
from tests.support.metrics import sample
from tests.support.polling import eventually
from tests.support.upstreams import RecordingUpstream


async def test_a_key_disabled_while_its_request_body_arrives_is_not_forwarded(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key()
    async with client_session() as http, http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
        assert resp.status == 200  # verified and cached
    echo.requests.clear()
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    try:
        writer.write(f"POST /sse-forever HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        await writer.drain()
        # The head is authenticated (a cache hit: the key was verified above); the handler waits
        # for the body.
        await eventually(lambda: sample(sidecar.services.registry, "toolio_sidecar_cache_hits_total") >= 1)
        await sidecar.disable(record.id)
        writer.write(body[5:])
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            rest = await reader.read()  # the connection ends: refused, or cut at once
    finally:
        writer.close()
    # Refused (401) or dropped when the cut cancelled the body read; either way never forwarded.
    assert b" 200 " not in status_line, status_line + rest
    assert echo.requests == []


async def test_re_enabled_key_works_at_once_even_after_many_refusals_while_disabled(
        sidecar: RunningSidecar) -> None:
    record, key = await sidecar.create_key()
    await sidecar.disable(record.id)
    limit = sidecar.settings.auth.failures_per_minute_per_lookup_id
    async with client_session() as http:
        for _ in range(limit + 3):
            async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
                assert resp.status == 401
        await sidecar.enable(record.id)
        async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
            assert resp.status == 200


async def test_failed_attempts_reach_the_audit_log_within_seconds_aggregated(
        sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    wrong = key[:12] + ("A" if key[12] != "A" else "B") + key[13:]  # bad checksum, same lookup id
    async with client_session() as http:
        for _ in range(3):
            async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(wrong)) as resp:
                assert resp.status == 401
    store = sidecar.services.store

    async def failures() -> list[dict[str, object]]:  # the housekeeping tick writes them within ~5 s
        return [e.as_json() for e in await store.list_audit(sidecar.settings.workspace, 50, None)
                if e.action == "auth.failed"]

    events = await eventually(failures)
    assert len(events) == 1, events
    details = events[0]["details"]
    assert isinstance(details, dict)
    assert details["count"] == 3
    assert key not in json.dumps(events) and wrong not in json.dumps(events)
