"""The proxy listener against a real aiohttp upstream (docs/reference/headers.md): what is forwarded, what is
stripped and added, streaming, upstream failures, limits, session binding, cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sidecar.proxy.headers import HOP_BY_HOP, IDENTITY_HEADERS
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.raw import RawResponse, closed_port, raw_request
from tests.support.upstreams import RecordingUpstream, SeenRequest

FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")


async def _raw(sidecar: RunningSidecar, key: str | None, headers: list[tuple[str, str]],
               method: str = "GET", path: str = "/mcp", body: bytes = b"") -> RawResponse:
    sent = [("Host", f"127.0.0.1:{sidecar.proxy_port}")]
    if key is not None:
        sent.append(("Authorization", f"Bearer {key}"))
    return await raw_request(sidecar.proxy_port, method, path, sent + headers, body)


def _assert_identity(seen: SeenRequest, key_id: str, name: str, roles: str, perms: str) -> None:
    for header in IDENTITY_HEADERS:
        assert len(seen.all(header)) == 1, header
    assert seen.one("X-Toolio-Key-Id") == key_id
    assert seen.one("X-Toolio-Key-Name") == name
    assert seen.one("X-Toolio-Workspace") == "acme"
    assert seen.one("X-Toolio-Roles") == roles
    assert seen.one("X-Toolio-Permissions") == perms
    assert seen.one("X-Toolio-Assertion").count(".") == 2


# -- forwarding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_query_and_body_are_forwarded_unchanged(
        sidecar: RunningSidecar, echo: RecordingUpstream, method: str) -> None:
    _, key = await sidecar.create_key()
    body = b'{"jsonrpc":"2.0","id":1}' if method not in ("GET", "OPTIONS") else b""
    path = "/mcp/a%2Fb/c?x=1&y=%20z&x=2"
    async with client_session() as http, \
            http.request(method, sidecar.proxy_url + path, data=body or None, headers=bearer(key)) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["method"] == method
    assert echoed["path_qs"] == path
    assert echoed["body"] == body.decode()
    assert echo.requests[0].path_qs == path


async def test_upstream_status_and_end_to_end_headers_come_back(sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    async with client_session() as http, \
            http.get(sidecar.proxy_url + "/missing?status=404&session=abc", headers=bearer(key)) as resp:
        assert resp.status == 404
        assert resp.headers["Mcp-Session-Id"] == "abc"
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_upstream_hop_by_hop_response_fields_stay_between_proxy_and_upstream(
        sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    resp = await _raw(sidecar, key, [], path="/mcp?hop=1")
    assert resp.status == 200
    names = {name.lower() for name, _ in resp.headers}
    assert "x-upstream-hop" not in names
    assert "keep-alive" not in names
    assert resp.header("X-End-To-End") == "kept"
    assert all("x-upstream-hop" not in v.lower() for k, v in resp.headers if k.lower() == "connection")


async def test_upstream_sees_its_own_host_and_the_client_host_as_forwarded_host(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key("agent", ["viewer", "writer"])
    resp = await raw_request(sidecar.proxy_port, "GET", "/mcp",
                             [("Host", "mcp.example.com:8443"), ("Authorization", f"Bearer {key}")])
    assert resp.status == 200
    seen = echo.requests[0]
    assert seen.one("Host") == echo.url.removeprefix("http://")
    assert seen.one("X-Forwarded-Host") == "mcp.example.com:8443"
    assert seen.one("X-Forwarded-Proto") == "http"
    assert seen.one("X-Forwarded-For") == "127.0.0.1"
    _assert_identity(seen, record.id, "agent", "viewer,writer", "plans:read,plans:write")
    assert seen.all("Authorization") == []


async def test_spoofed_identity_and_hop_by_hop_headers_never_reach_the_upstream(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key("honest", ["viewer"])
    spoofed = [
        ("X-Toolio-Key-Id", "key_spoofed"),
        ("x-toolio-roles", "org-admin"),
        ("X_Toolio_Key_Name", "spoofed"),
        ("x_toolio_permissions", "org:settings"),
        ("X-Toolio-Workspace", "globex"),
        ("X-Toolio-Workspace", "initech"),
        ("X-TOOLIO-ASSERTION", "a.b.c"),
        ("X-Toolio-Something-New", "x"),
        ("Connection", "X-Secret-Hop, keep-alive"),
        ("X-Secret-Hop", "for the proxy only"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("X-Custom", "kept"),
        ("X-Custom", "kept twice"),
        ("Accept", "application/json, text/event-stream"),
    ]
    resp = await _raw(sidecar, key, spoofed)
    assert resp.status == 200
    seen = echo.requests[0]
    _assert_identity(seen, record.id, "honest", "viewer", "plans:read")
    names = [name.lower() for name, _ in seen.headers]
    assert not [n for n in names if "_" in n]
    assert "authorization" not in names
    assert "x-secret-hop" not in names
    assert not HOP_BY_HOP & set(names) - {"connection"}
    # Any Connection header upstream belongs to the proxy's own hop, never the client's.
    assert all("x-secret-hop" not in v.lower() for v in seen.all("Connection"))
    assert "x-toolio-something-new" not in names
    assert seen.all("X-Custom") == ["kept", "kept twice"]
    assert seen.one("Accept") == "application/json, text/event-stream"
    for header in FORWARDED_HEADERS:
        assert len(seen.all(header)) == 1, header
    assert "key_spoofed" not in resp.body.decode()


async def test_untrusted_peer_forwarding_headers_are_replaced(sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    resp = await _raw(sidecar, key, [
        ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=203.0.113.9;proto=https"), ("X-Real-IP", "203.0.113.9"),
        ("X_Forwarded_For", "203.0.113.10"),
    ])
    assert resp.status == 200
    seen = echo.requests[0]
    assert seen.one("X-Forwarded-For") == "127.0.0.1"
    assert seen.one("X-Forwarded-Proto") == "http"
    assert seen.one("X-Forwarded-Host") == f"127.0.0.1:{sidecar.proxy_port}"
    assert seen.all("Forwarded") == []
    assert seen.all("X-Real-IP") == []


async def test_trusted_peer_forwarding_headers_are_kept_and_appended(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url,
                                                             "trusted_proxies": ["127.0.0.0/8"]}}))
    _, key = await sidecar.create_key()
    resp = await _raw(sidecar, key, [
        ("X-Forwarded-For", "203.0.113.9, 10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "mcp.example.com"),
    ])
    assert resp.status == 200
    seen = echo.requests[0]
    assert seen.one("X-Forwarded-For") == "203.0.113.9, 10.0.0.1, 10.0.0.2, 127.0.0.1"
    assert seen.one("X-Forwarded-Proto") == "https"
    assert seen.one("X-Forwarded-Host") == "mcp.example.com"


async def test_public_endpoints_answer_without_credentials_and_never_reach_upstream(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    probes = ["/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp",
              "/.well-known/oauth-authorization-server", "/.well-known/oauth-authorization-server/mcp",
              "/.well-known/openid-configuration"]
    async with client_session() as http:
        for path in probes:
            async with http.get(sidecar.proxy_url + path) as resp:
                assert resp.status == 404, path
                assert resp.content_type == "application/json"
                assert set(await resp.json()) == {"error", "error_description"}
                assert "WWW-Authenticate" not in resp.headers
            async with http.post(sidecar.proxy_url + path, data=b"{}") as resp:
                assert resp.status == 404, path  # any method: a probe never gets a challenge
        for base in (sidecar.proxy_url, sidecar.admin_url):
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(base + "/.well-known/jwks.json") as resp:
                assert resp.status == 200
                assert (await resp.json())["keys"]
    assert echo.requests == []


# -- streaming ----------------------------------------------------------------------------------


async def test_sse_events_stream_through_as_written_with_no_total_timeout(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url,
                                                             "upstream_timeout_seconds": 0.3}}))
    _, key = await sidecar.create_key()
    arrivals: list[float] = []
    async with client_session() as http, \
            http.get(sidecar.proxy_url + "/sse?events=8&interval=0.12", headers=bearer(key)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        started = time.monotonic()
        events = []
        while True:
            try:
                event = await resp.content.readuntil(b"\n\n")
            except asyncio.IncompleteReadError:
                break
            if not event:
                break
            arrivals.append(time.monotonic() - started)
            events.append(event)
    assert [e.decode() for e in events] == [f"id: {n}\ndata: event {n}\n\n" for n in range(8)]
    assert arrivals[-1] > 0.3 * 2  # the stream outlived upstream_timeout_seconds, and kept flowing
    assert arrivals[0] < 0.3        # the first event came when written, not with the last


async def test_request_body_is_streamed_to_the_upstream_chunk_by_chunk(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    parts = [b"a" * 100, b"b" * 100, b"c" * 100]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with client_session() as http, \
            http.post(sidecar.proxy_url + "/upload", data=body(), headers=bearer(key)) as resp:
        assert resp.status == 200
        assert (await resp.json())["body"] == b"".join(parts).decode()
    assert echo.requests[0].all("Transfer-Encoding") == ["chunked"]
    assert echo.requests[0].complete


async def test_client_disconnect_cancels_the_upstream_request_promptly(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    writer.write(f"GET /hang HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(echo.hang_started.wait(), 2.0)
    writer.close()
    await writer.wait_closed()
    started = time.monotonic()
    # Promptly: not at the upstream timeout (30 s by default).
    await asyncio.wait_for(echo.hang_cancelled.wait(), 5.0)
    assert time.monotonic() - started < 5.0
    assert not await reader.read()


# -- upstream failures --------------------------------------------------------------------------


async def test_unreachable_upstream_is_502_json_without_identity(
        config: ConfigFactory, start_sidecar: SidecarStarter) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": f"http://127.0.0.1:{closed_port()}"}}))
    record, key = await sidecar.create_key("agent-502")
    async with client_session() as http, http.post(sidecar.proxy_url + "/mcp", data=b"{}",
                                                   headers=bearer(key)) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        text = await resp.text()
        for header in IDENTITY_HEADERS:
            assert header not in resp.headers
    body = json.loads(text)
    assert set(body) == {"error", "error_description"}
    for secret in (key, record.id, "agent-502", record.lookup_id, "X-Toolio"):
        assert secret not in text


async def test_upstream_that_never_answers_is_504_after_the_head_timeout(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url,
                                                             "upstream_timeout_seconds": 0.5}}))
    record, key = await sidecar.create_key("agent-504")
    started = time.monotonic()
    async with client_session() as http, http.get(sidecar.proxy_url + "/hang", headers=bearer(key)) as resp:
        assert resp.status == 504
        assert resp.content_type == "application/json"
        text = await resp.text()
        for header in IDENTITY_HEADERS:
            assert header not in resp.headers
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 2.0
    assert set(json.loads(text)) == {"error", "error_description"}
    for secret in (key, record.id, "agent-504", "X-Toolio"):
        assert secret not in text
    await asyncio.wait_for(echo.hang_cancelled.wait(), 1.0)  # the upstream request was abandoned


# -- limits -------------------------------------------------------------------------------------


@pytest.fixture
async def small_limit(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> RunningSidecar:
    return await start_sidecar(config.settings({"proxy": {"upstream": echo.url, "max_body_bytes": 1000,
                                                          "allowed_origins": ["https://app.example.com"]}}))


async def test_declared_body_over_the_limit_is_413(small_limit: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await small_limit.create_key()
    async with client_session() as http:
        async with http.post(small_limit.proxy_url + "/mcp", data=b"x" * 1001, headers=bearer(key)) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "body_too_large"
        async with http.post(small_limit.proxy_url + "/mcp", data=b"x" * 1000, headers=bearer(key)) as resp:
            assert resp.status == 200
    assert [len(r.body) for r in echo.requests] == [1000]


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
        small_limit: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await small_limit.create_key()
    # Only the head: a proxy that waited for the body to count it would never answer.
    resp = await _raw(small_limit, key, [("Content-Length", str(10**9)), ("Content-Type", "application/json")],
                      method="POST")
    assert resp.status == 413
    assert resp.json()["error"] == "body_too_large"
    assert echo.requests == []


async def test_chunked_body_over_the_limit_is_413_and_never_fully_forwarded(
        small_limit: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await small_limit.create_key()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 300
            await asyncio.sleep(0.01)

    async with client_session() as http, \
            http.post(small_limit.proxy_url + "/mcp", data=body(), headers=bearer(key)) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"
    # The upstream may have seen the first chunks, never the whole body.
    assert all(len(r.body) <= 1000 and not r.complete for r in echo.requests)


async def test_origin_must_be_allowed_when_present(small_limit: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await small_limit.create_key()
    async with client_session() as http:
        for origin, status in (("https://evil.example", 403), ("https://app.example.com", 200),
                               ("https://APP.example.com", 200), ("null", 403), (None, 200)):
            headers = bearer(key) | ({"Origin": origin} if origin else {})
            async with http.get(small_limit.proxy_url + "/mcp", headers=headers) as resp:
                assert resp.status == status, origin
                if status == 403:
                    assert (await resp.json())["error"] == "origin_not_allowed"
    assert len(echo.requests) == 3


async def test_session_is_bound_to_the_key_that_opened_it(sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, owner = await sidecar.create_key("owner")
    _, other = await sidecar.create_key("other")
    async with client_session() as http:
        async with http.post(sidecar.proxy_url + "/mcp?session=s-123", headers=bearer(owner)) as resp:
            assert resp.headers["Mcp-Session-Id"] == "s-123"
        session = {"Mcp-Session-Id": "s-123"}
        async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(other) | session) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "session_forbidden"
        async with http.delete(sidecar.proxy_url + "/mcp", headers=bearer(other) | session) as resp:
            assert resp.status == 403
        async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(owner) | session) as resp:
            assert resp.status == 200
        async with http.post(sidecar.proxy_url + "/mcp", headers=bearer(other) | {"Mcp-Session-Id": "fresh"}) as resp:
            # An id nobody was issued is never forwarded: the MCP transport's answer for an
            # unknown session, which tells the client to start a new one.
            assert resp.status == 404
            assert (await resp.json())["error"] == "session_not_found"
    assert len(echo.requests) == 2


@pytest.mark.parametrize(("method", "target", "extra"), [
    ("GET", "http://evil.example/steal", []),
    ("GET", "/mcp", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
])
async def test_unsupported_request_forms_are_400(sidecar: RunningSidecar, echo: RecordingUpstream, method: str,
                                                 target: str, extra: list[tuple[str, str]]) -> None:
    _, key = await sidecar.create_key()
    resp = await _raw(sidecar, key, extra, method=method, path=target)
    assert resp.status == 400
    assert resp.json()["error"] == "invalid_request"
    assert echo.requests == []


async def test_access_log_line_names_the_key_not_the_secret(sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key("logged")
    headers = bearer(key) | {"Mcp-Method": "tools/call", "Mcp-Name": "add"}
    async with client_session() as http, http.post(sidecar.proxy_url + "/mcp?q=1", headers=headers) as resp:
        assert resp.status == 200
    access = [line for line in sidecar.log_lines() if line["type"] == "access"]
    assert len(access) == 1
    assert access[0]["key_name"] == "logged"
    assert access[0]["method"] == "POST"
    assert access[0]["path"] == "/mcp"
    assert access[0]["mcp_method"] == "tools/call"
    assert access[0]["mcp_name"] == "add"
    assert access[0]["status"] == 200
    assert access[0]["duration_ms"] >= 0
    assert key not in sidecar.log_stream.getvalue()


async def test_client_error_mid_stream_does_not_break_the_next_request(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    async with aiohttp.ClientSession(trust_env=False) as http:
        resp = await http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(key))
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client walks away mid-stream
        await asyncio.wait_for(echo.sse_closed.wait(), 1.0)
        async with http.get(sidecar.proxy_url + "/after", headers=bearer(key)) as again:
            assert again.status == 200


async def test_requests_near_the_listeners_own_paths_are_proxied_like_any_other(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    # The public app (app.ProxyApp) routes by hand; this pins that it routes as docs/reference/headers.md reads: the
    # app's own GET paths with another method, and paths that only share a prefix with a
    # discovery path, are the MCP server's.
    _, key = await sidecar.create_key()
    async with client_session() as http:
        for method, path in [("POST", "/healthz"), ("DELETE", "/.well-known/jwks.json"),
                             ("GET", "/.well-known/oauth-protected-resourceX"), ("GET", "/healthz/x")]:
            # The app's own paths, escaped (sent byte for byte) or with a query, are still the app's.
            for own, status in (("/%68ealthz", 200), ("/healthz?probe=1", 200),
                                ("/.well-known/%6Fauth-protected-resource/mcp", 404)):
                answer = await raw_request(sidecar.proxy_port, "GET", own, [("Host", "x")])
                assert answer.status == status, own
                assert answer.header("WWW-Authenticate") is None, own
            async with http.request(method, sidecar.proxy_url + path, headers=bearer(key)) as resp:
                assert resp.status == 200, (method, path)
                assert (await resp.json())["path_qs"] == path
            async with http.request(method, sidecar.proxy_url + path) as resp:
                assert resp.status == 401, (method, path)
    assert [(r.method, r.path_qs) for r in echo.requests] == [
        ("POST", "/healthz"), ("DELETE", "/.well-known/jwks.json"),
        ("GET", "/.well-known/oauth-protected-resourceX"), ("GET", "/healthz/x")]


async def test_expect_100_continue_is_answered_by_the_sidecar_and_the_body_forwarded(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    # RFC 9110 10.1.1: the client waits for 100 (Continue) before sending the body; the sidecar
    # answers it itself and never passes Expect upstream (it is not the upstream's to answer).
    _, key = await sidecar.create_key()
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
    try:
        writer.write(f"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert len(echo.requests) == 1
    seen = echo.requests[0]
    assert seen.path_qs == "/mcp"
    assert seen.all("Expect") == []
    assert seen.body == body
