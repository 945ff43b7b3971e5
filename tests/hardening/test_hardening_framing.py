"""Request framing over raw sockets (RFC 9112): ambiguous or malformed messages are answered
400 and nothing of them reaches the upstream, also when they ride behind a valid request on a
kept-alive connection; upgrades are refused; absolute-form targets never pick the upstream.

Every attack carries a *valid* key, so the only thing standing between it and the upstream is
the framing check; the recording upstream proves what was (not) forwarded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.proxy.assertion import verify
from tests.support.config import hardening_settings
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.raw import exchange, http_request, parse_responses
from tests.support.upstreams import RecordingUpstream, recording_upstream

pytestmark = pytest.mark.timeout(60)

MARK = "SMUGGLED"

# Each template is one request head (+ body) with a valid key; "{key}" is filled in. They differ
# from a well-formed request only in the framing defect named by the id.
MALFORMED: dict[str, bytes] = {
    # RFC 9112 6.1: CL and TE together "ought to be handled as an error" (the classic CL.TE/TE.CL).
    "content-length-and-transfer-encoding": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"),
    # RFC 9112 6.3 (5): differing Content-Length values are unrecoverable.
    "duplicate-content-length": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nhello"),
    "content-length-list": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Content-Length: 3, 5\r\n\r\nhello"),
    "content-length-not-a-number": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Content-Length: +5\r\n\r\nhello"),
    # RFC 9112 6.3 (4): a request whose final transfer coding is not chunked cannot be framed.
    "transfer-encoding-xchunked": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "transfer-encoding-chunked-then-identity": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "transfer-encoding-split-over-two-lines": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "transfer-encoding-with-space-before-colon": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello"),
    # RFC 9112 5.2: obs-fold in a request "MUST" be rejected (400) or replaced; we expect 400.
    "obs-fold": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"X-Folded: one\r\n two\r\n\r\n"),
    # RFC 9112 2.2: a bare LF as a line terminator is a smuggling vector; we expect 400.
    "bare-lf-in-head": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\nHost: a\nAuthorization: Bearer {key}\n\n"),
    "bare-lf-after-one-field": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\nAuthorization: Bearer {key}\r\n\r\n"),
    # RFC 9110 5.5: CR, LF and NUL are never valid in a field value.
    "nul-in-field-value": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"X-Note: a\x00b\r\n\r\n"),
    "bare-cr-in-field-value": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"X-Note: a\rb\r\n\r\n"),
    # RFC 9112 3.2: an HTTP/1.1 request without Host, or with two, MUST be answered 400.
    "missing-host": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nAuthorization: Bearer {key}\r\n\r\n"),
    "duplicate-host": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer {key}\r\n\r\n"),
    "host-with-two-values": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a, b\r\nAuthorization: Bearer {key}\r\n\r\n"),
    # RFC 9112 5.1: no whitespace between field name and colon.
    "space-before-colon": (
        b"GET /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization : Bearer {key}\r\n\r\n"),
    "invalid-chunk-size": (
        b"POST /" + MARK.encode() + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
}


def _fill(template: bytes, key: str) -> bytes:
    return template.replace(b"{key}", key.encode())


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream() as up:
        yield up


@pytest.fixture
async def sidecar(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as running:
        yield running


@pytest.fixture
async def key(sidecar: RunningSidecar) -> str:
    _, full = await sidecar.create_key("framing")
    return full


async def test_well_formed_request_with_valid_key_is_forwarded(sidecar: RunningSidecar, upstream: RecordingUpstream,
                                                               key: str) -> None:
    # The control for every test below: the same listener does forward a sound request.
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/control", [("Authorization", f"Bearer {key}")]))
    [response] = parse_responses(raw)
    assert response.status == 200
    assert [h.split(b"\r\n")[0] for h in upstream.request_heads()] == [b"GET /control HTTP/1.1"]


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_framing_is_rejected_with_400_and_never_forwarded(
        case: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    raw = await exchange(sidecar.proxy_port, _fill(MALFORMED[case], key))
    responses = parse_responses(raw)
    assert responses, f"no answer to {case}"
    assert responses[0].status == 400, raw[:200]
    assert upstream.received == b"", f"{case} reached the upstream: {upstream.received[:200]!r}"
    # The answer is our JSON, and it quotes nothing of the request (aiohttp's default page quotes
    # the offending line, Authorization value included).
    assert responses[0].json()["error"] == "invalid_request"
    assert key.encode() not in raw
    assert key[4:12].encode() not in raw


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_request_pipelined_in_the_same_packet_after_a_valid_one_is_never_forwarded(
        case: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    first = http_request("GET", "/first", [("Authorization", f"Bearer {key}")], close=False)
    raw = await exchange(sidecar.proxy_port, first + _fill(MALFORMED[case], key))
    statuses = [r.status for r in parse_responses(raw)]
    # The valid request may be answered first or dropped with the connection; the malformed one
    # is always a 400 and its bytes never reach the upstream.
    assert statuses in ([200, 400], [400]), statuses
    assert MARK.encode() not in upstream.received
    assert len(upstream.request_heads()) == statuses.count(200)


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_request_sent_later_on_a_kept_alive_connection_is_never_forwarded(
        case: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    first = http_request("GET", "/first", [("Authorization", f"Bearer {key}")], close=False)
    raw = await exchange(sidecar.proxy_port, [first, _fill(MALFORMED[case], key)], gap=0.1)
    statuses = [r.status for r in parse_responses(raw)]
    assert statuses == [200, 400], statuses
    assert MARK.encode() not in upstream.received
    assert [h.split(b"\r\n")[0] for h in upstream.request_heads()] == [b"GET /first HTTP/1.1"]


async def test_broken_chunked_body_after_a_forwarded_head_never_completes_a_request_upstream(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # The head is sound, so the request is authenticated and streamed upstream; the framing
    # error comes later, in the body. The upstream must never see a complete request.
    head = (f"POST /{MARK} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").encode()
    raw = await exchange(sidecar.proxy_port, [head, b"zz\r\nworld\r\n0\r\n\r\n"], gap=0.2)
    responses = parse_responses(raw)
    assert [r.status for r in responses] in ([400], []), raw[:300]
    assert key.encode() not in raw
    assert upstream.completed == []
    assert b"world" not in upstream.received


async def test_request_smuggled_inside_a_body_is_forwarded_only_as_body(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # A body that looks like a second request is just bytes of the first one's body: the upstream
    # receives one request whose Content-Length covers the lookalike exactly.
    inner = f"GET /{MARK} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    raw = await exchange(sidecar.proxy_port, http_request("POST", "/outer", [("Authorization", f"Bearer {key}")],
                                                    body=inner))
    assert [r.status for r in parse_responses(raw)] == [200]
    [connection] = upstream.connections
    received = bytes(connection.received)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /outer ")
    assert f"content-length: {len(inner)}\r\n".encode() in head.lower() + b"\r\n"
    assert body == inner


@pytest.mark.parametrize("upgrade", ["websocket", "h2c", "TLS/1.2"])
async def test_upgrade_requests_are_refused_with_400_and_never_forwarded(
        upgrade: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    request = http_request("GET", f"/{MARK}", [
        ("Authorization", f"Bearer {key}"), ("Connection", "Upgrade"), ("Upgrade", upgrade),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ], close=False)
    # Bytes that a client would send after a successful switch must not be read as HTTP and
    # forwarded either.
    after = b"\x81\x85" + f"GET /{MARK}2 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    raw = await exchange(sidecar.proxy_port, [request, after], gap=0.2)
    responses = parse_responses(raw)
    assert responses
    assert responses[0].status == 400
    assert all(r.status != 101 and r.status < 500 for r in responses)
    assert upstream.received == b""


@pytest.mark.parametrize("target", [
    "http://evil.example/x",
    "http://127.0.0.1:1/x",
    "https://evil.example:443/x?y=1",
    "//evil.example/x",
    "evil.example:443",
    "*",
])
async def test_absolute_form_and_odd_targets_never_change_the_upstream(
        target: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    method = "OPTIONS" if target == "*" else "CONNECT" if target == "evil.example:443" else "GET"
    raw = await exchange(sidecar.proxy_port, http_request(method, target, [("Authorization", f"Bearer {key}")],
                                                    host="evil.example"))
    responses = parse_responses(raw)
    assert responses
    status = responses[0].status
    # Either refused, or forwarded to the configured upstream as an origin-form path; never a
    # connection anywhere else (the upstream is the only listener that can have seen it).
    assert status in (200, 400, 404), status
    heads = upstream.request_heads()
    if status == 200:
        # Forwarded: then it is origin-form on the wire, to the configured upstream's own Host.
        assert len(heads) == 1
        request_line = heads[0].split(b"\r\n")[0]
        assert request_line.split(b" ")[1].startswith(b"/")
        assert b"://" not in request_line
        assert f"\r\nhost: 127.0.0.1:{upstream.port}\r\n".encode() in heads[0].lower()
    else:
        assert upstream.received == b""


@pytest.mark.parametrize("target", ["/" + MARK, "example.com:443"], ids=["origin-form", "authority-form"])
@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
async def test_connect_is_refused_and_never_reaches_the_upstream(
        target: str, with_key: bool, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # CONNECT asks for a tunnel (RFC 9110 9.3.6), which an MCP server does not offer; forwarded,
    # a 2xx would turn the upstream connection into one. No route takes a CONNECT target, so the
    # router answers 404 (the proxy's own guard, behind it, would answer 400).
    headers = [("Authorization", f"Bearer {key}")] if with_key else []
    raw = await exchange(sidecar.proxy_port, http_request("CONNECT", target, headers))
    [response] = parse_responses(raw)
    assert response.status == 404, raw[:200]
    assert upstream.received == b""


@pytest.mark.parametrize("target", ["/mcp#x", "/mcp?q=1#x", "/mcp#"])
async def test_a_target_with_a_fragment_is_refused_with_400_and_never_forwarded(
        target: str, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # RFC 9112 3.2.1: origin-form has no fragment (RFC 9110 7.1: a client removes it). Forwarded,
    # the upstream would see a target other than the one the assertion was signed for.
    raw = await exchange(sidecar.proxy_port, http_request("GET", target, [("Authorization", f"Bearer {key}")]))
    [response] = parse_responses(raw)
    assert response.status == 400
    assert response.json()["error"] == "invalid_request"
    assert upstream.received == b""


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
async def test_a_fragment_on_the_sidecars_own_path_is_answered_by_that_path(
        with_key: bool, sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    # The router drops the fragment, so /healthz#x is /healthz: answered by the sidecar itself,
    # like /healthz, never proxied (and never a 401 for want of a key).
    headers = [("Authorization", f"Bearer {key}")] if with_key else []
    plain = parse_responses(await exchange(sidecar.proxy_port, http_request("GET", "/healthz", headers)))
    with_fragment = parse_responses(await exchange(sidecar.proxy_port, http_request("GET", "/healthz#x", headers)))
    assert [(r.status, r.json()) for r in with_fragment] == [(r.status, r.json()) for r in plain]
    assert [r.status for r in with_fragment] == [200]
    assert upstream.received == b""


async def test_sidecar_stays_healthy_after_a_volley_of_malformed_requests(
        sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> None:
    for template in MALFORMED.values():
        await exchange(sidecar.proxy_port, _fill(template, key), wait=1.0)
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/healthz"))
    assert [r.status for r in parse_responses(raw)] == [200]
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/after", [("Authorization", f"Bearer {key}")]))
    assert [r.status for r in parse_responses(raw)] == [200]
    assert MARK.encode() not in upstream.received


# ---------------------------------------------------------------------------------------------
# Identity spoofing: whatever the client sends, the upstream sees exactly the sidecar's identity.

SPOOFS: tuple[tuple[str, str], ...] = (
    ("X-Toolio-Key-Id", "key_evil"),
    ("x-toolio-key-id", "key_evil2"),
    ("X-TOOLIO-KEY-NAME", "evil"),
    ("X_Toolio_Roles", "org-admin"),
    ("x_toolio_permissions", "org:settings"),
    ("X-Toolio_Workspace", "other"),
    ("X-Toolio-Workspace", "other2"),
    ("X-Toolio-Assertion", "forged.jwt.value"),
    ("X_TOOLIO_ASSERTION", "forged2"),
    ("X-Toolio-Subject", "user:admin"),
    ("x_toolio_subject", "user:admin2"),
    ("X-Toolio-Anything-Else", "evil"),
    ("Some_Header", "evil-underscore"),
    ("X-Hop-Secret", "evil-hop"),
    ("Connection", "keep-alive, X-Hop-Secret, X-Toolio-Key-Id, X-Toolio-Roles"),
    ("Keep-Alive", "timeout=999"),
    ("TE", "trailers"),
    ("Proxy-Authorization", "Basic ZXZpbDpldmls"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("x-forwarded-for", "7.7.7.7"),
    ("X-Forwarded-Proto", "gopher"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "1"),
    ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6;host=evil.example;proto=gopher"),
    ("X-Kept", "ordinary"),
)


def _field_lines(head: bytes) -> list[tuple[str, str]]:
    lines = head.split(b"\r\n")[1:]
    out = []
    for line in lines:
        if line:
            name, _, value = line.partition(b":")
            out.append((name.decode("latin-1"), value.decode("latin-1").strip()))
    return out


async def _spoofed_request_head(sidecar: RunningSidecar, upstream: RecordingUpstream, key: str) -> bytes:
    headers = [("Authorization", f"Bearer {key}"), *SPOOFS]
    raw = await exchange(sidecar.proxy_port, http_request("GET", "/spoof?q=1", headers, host="client.example"))
    assert [r.status for r in parse_responses(raw)] == [200]
    [head] = upstream.request_heads()
    return head


async def test_spoofed_identity_headers_never_reach_the_upstream_only_the_sidecars_do(
        sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    record, key = await sidecar.create_key("spoof-victim", ["viewer"])
    head = await _spoofed_request_head(sidecar, upstream, key)
    lines = _field_lines(head)
    names = [name.lower() for name, _ in lines]
    # Exactly one line per identity header, with the sidecar's value.
    expected = {
        "x-toolio-key-id": record.id,
        "x-toolio-key-name": "spoof-victim",
        "x-toolio-workspace": "acme",
        "x-toolio-roles": "viewer",
        "x-toolio-permissions": "plans:read",
        "x-toolio-subject": f"key:{record.id}",
    }
    for name, value in expected.items():
        assert [v for n, v in lines if n.lower() == name] == [value], name
    assert names.count("x-toolio-assertion") == 1
    assert sorted(n for n in names if n.startswith("x-toolio-")) == sorted([*expected, "x-toolio-assertion"])
    # The assertion is the sidecar's own, signed, for this key and this request.
    assertion = next(v for n, v in lines if n.lower() == "x-toolio-assertion")
    jwks = json.loads(sidecar.services.signer.jwks_body) if sidecar.services.signer else {}
    claims = verify(assertion, jwks=jwks, method="GET", path="/spoof?q=1")
    assert claims["sub"] == record.id
    assert claims["roles"] == ["viewer"]
    # Names with "_" are dropped whatever they say; hop-by-hop fields and fields named in
    # Connection are gone; credentials are gone.
    assert all("_" not in n for n in names)
    for gone in ("x-hop-secret", "connection", "keep-alive", "te", "proxy-authorization", "authorization",
                 "forwarded", "x-real-ip", "x-forwarded-port", "x-toolio-anything-else"):
        assert gone not in names, gone
    # Untrusted forwarding information is replaced by what the sidecar saw.
    assert [v for n, v in lines if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for n, v in lines if n.lower() == "x-forwarded-proto"] == ["http"]
    assert [v for n, v in lines if n.lower() == "x-forwarded-host"] == ["client.example"]
    # Host is the upstream's own; ordinary headers pass untouched.
    assert [v for n, v in lines if n.lower() == "host"] == [f"127.0.0.1:{upstream.port}"]
    assert ("X-Kept", "ordinary") in lines
    text = head.decode("latin-1")
    for evil in ("evil", "6.6.6.6", "7.7.7.7", "gopher", "other", "forged", "org-admin", "org:settings", key):
        assert evil not in text, evil


async def test_forwarding_headers_from_a_trusted_proxy_are_kept_and_appended(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url, proxy={"trusted_proxies": ["127.0.0.0/8"]})
    async with running_sidecar(settings) as sidecar:
        record, key = await sidecar.create_key("behind-proxy")
        head = await _spoofed_request_head(sidecar, upstream, key)
    lines = _field_lines(head)
    names = [name.lower() for name, _ in lines]
    # The proxy's hops are believed and ours is appended (RFC 7239 style, left to right).
    assert [v for n, v in lines if n.lower() == "x-forwarded-for"] == ["6.6.6.6, 7.7.7.7, 127.0.0.1"]
    assert [v for n, v in lines if n.lower() == "x-forwarded-proto"] == ["gopher"]
    assert [v for n, v in lines if n.lower() == "x-forwarded-host"] == ["evil.example"]
    assert [v for n, v in lines if n.lower() == "forwarded"] == ["for=6.6.6.6;host=evil.example;proto=gopher"]
    # Identity is never something a proxy can vouch for: still exactly the sidecar's.
    assert [v for n, v in lines if n.lower() == "x-toolio-key-id"] == [record.id]
    assert len([n for n in names if n.startswith("x-toolio-")]) == 7
    assert all("_" not in n for n in names)


@pytest.mark.parametrize("name", ["X-Toolio-Key-Id", "x-toolio-roles", "X_TOOLIO_PERMISSIONS",
                                  "X-Toolio_Key-Name", "x-toolio-workspace", "X-Toolio-Assertion"])
async def test_a_single_spoofed_identity_header_in_any_spelling_is_replaced(
        name: str, sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    record, key = await sidecar.create_key("single")
    raw = await exchange(sidecar.proxy_port, http_request(
        "GET", "/one", [(name, "spoofed"), ("Authorization", f"Bearer {key}"), (name, "spoofed-again")]))
    assert [r.status for r in parse_responses(raw)] == [200]
    [head] = upstream.request_heads()
    assert b"spoofed" not in head
    canonical = name.replace("_", "-").lower()
    values = [v for n, v in _field_lines(head) if n.lower() == canonical]
    assert len(values) == 1
    if canonical == "x-toolio-key-id":
        assert values == [record.id]
