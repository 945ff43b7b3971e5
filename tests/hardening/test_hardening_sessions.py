"""Regression tests for the security review's findings on the public port:

* an ``Mcp-Session-Id`` is bound to the key that opened it for every spelling of the id the
  upstream could read as the same (RFC 9110 5.5: whitespace around a value is not part of it),
  every method, before and after a restart; a binding never moves to another key; an id that was
  never issued is never forwarded; a repeated ``Mcp-Session-Id`` is refused;
* an expired key's open stream is cut within a second of ``expires_at``, with a ``key.expired``
  audit event;
* a key in the query string is refused at any depth of percent-encoding;
* with an upstream base path, the assertion's ``htu`` is the target the upstream receives.

Real parts only: raw sockets, a recording upstream on loopback, the real MCP SDK, SQLite files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest

from sidecar.keys.records import AuditRecord, to_rfc3339
from tests.support.config import ConfigFactory, hardening_settings
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session, running_sidecar
from tests.support.mcp import mcp_client, mcp_url
from tests.support.polling import eventually
from tests.support.raw import exchange, http_request, parse_fields, parse_responses, raw_request
from tests.support.upstreams import RecordingUpstream, answer_ok

# --- session binding ----------------------------------------------------------------------------


def _issuing_sessions(steal: list[str] | None = None) -> RecordingUpstream:
    """Like an MCP server: a new session for a request without one, the id echoed otherwise.
    ``steal``: ids the upstream hands out instead of a fresh one (a confused upstream)."""
    counter = itertools.count(1)

    def headers(head: bytes) -> list[tuple[str, str]]:
        existing = parse_fields(head).get("mcp-session-id")
        if existing:
            return [("Mcp-Session-Id", existing[0].strip())]
        if steal:
            return [("Mcp-Session-Id", steal.pop())]
        return [("Mcp-Session-Id", f"session-{next(counter):04d}")]

    return RecordingUpstream(answer_ok(headers=headers))


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recording = _issuing_sessions()
    await recording.start()
    try:
        yield recording
    finally:
        await recording.stop()


async def _call(sidecar: RunningSidecar, key: str, session: str | None = None, method: str = "POST",
                extra: list[tuple[str, str]] | None = None) -> tuple[int, str, bytes]:
    headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
    if session is not None:
        headers.append(("Mcp-Session-Id", session))
    headers += extra or []
    raw = await exchange(sidecar.proxy_port, http_request(method, "/mcp", headers, b"{}" if method == "POST" else b""))
    [response] = parse_responses(raw)
    return response.status, response.fields.get("mcp-session-id", [""])[0], response.body


SPELLINGS = ["{}", " {}", "{} ", "{}\t", "\t{} \t", "  {}  "]


async def test_another_key_is_refused_for_every_spelling_of_a_session_id_and_every_method(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        status, session, _ = await _call(sidecar, alice)
        assert (status, session) == (200, "session-0001")
        forwarded = len(upstream.completed)
        for spelling in SPELLINGS:
            for method in ("POST", "GET", "DELETE"):
                status, _, body = await _call(sidecar, mallory, spelling.format(session), method)
                assert status == 403, (spelling, method)
                assert json.loads(body)["error"] == "session_forbidden"
        assert len(upstream.completed) == forwarded  # nothing of Mallory's reached the upstream
        # Alice keeps her session, under any spelling of it too.
        for spelling in SPELLINGS:
            assert (await _call(sidecar, alice, spelling.format(session)))[:2] == (200, session)


async def test_the_upstream_sees_the_session_id_without_surrounding_whitespace(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, session, _ = await _call(sidecar, alice)
        await _call(sidecar, alice, f" {session}\t ")
        assert parse_fields(upstream.completed[-1][0])["mcp-session-id"] == [session]


async def test_a_repeated_session_id_field_is_refused_and_not_forwarded(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        _, session, _ = await _call(sidecar, alice)
        forwarded = len(upstream.completed)
        for first, second in ((session, "session-9999"), ("session-9999", session), (session, session)):
            status, _, _ = await _call(sidecar, mallory, first, extra=[("Mcp-Session-Id", second)])
            assert status == 400
        assert len(upstream.completed) == forwarded


async def test_a_session_id_that_was_never_issued_is_not_forwarded(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as sidecar:
        _, mallory = await sidecar.create_key("mallory")
        status, _, body = await _call(sidecar, mallory, "session-0001")
        # The MCP transport's answer for an unknown session: the client starts a new one.
        assert status == 404
        assert json.loads(body)["error"] == "session_not_found"
        assert upstream.completed == []


async def test_a_binding_never_moves_even_when_the_upstream_hands_the_id_to_another_key(
        tmp_path: Path) -> None:
    steal: list[str] = []
    confused = _issuing_sessions(steal)
    await confused.start()
    try:
        async with running_sidecar(hardening_settings(tmp_path, confused.url)) as sidecar:
            _, alice = await sidecar.create_key("alice")
            _, mallory = await sidecar.create_key("mallory")
            _, session, _ = await _call(sidecar, alice)
            steal.append(session)
            status, handed, _ = await _call(sidecar, mallory)  # the upstream offers Alice's id
            assert status == 403
            assert handed == ""
            assert (await _call(sidecar, alice, session))[0] == 200
            assert (await _call(sidecar, mallory, session))[0] == 403
    finally:
        await confused.stop()


async def test_a_binding_in_use_outlives_its_ttl(tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url, proxy={"session_binding_ttl_seconds": 1},
                                  auth={"last_used_flush_seconds": 0.1})
    async with running_sidecar(settings) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        _, session, _ = await _call(sidecar, alice)
        for _ in range(8):  # 2.4 s in all, past the TTL and a prune, but used every 0.3 s
            assert (await _call(sidecar, alice, session))[:2] == (200, session)
            await asyncio.sleep(0.3)
        assert (await _call(sidecar, mallory, session))[0] == 403


async def test_bindings_survive_a_restart(tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url)
    async with running_sidecar(settings) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        _, session, _ = await _call(sidecar, alice)
    async with running_sidecar(settings) as restarted:
        # The first key to present the id after the restart does not get it.
        assert (await _call(restarted, mallory, session))[0] == 403
        assert (await _call(restarted, alice, session))[:2] == (200, session)
        assert (await _call(restarted, mallory, session, "DELETE"))[0] == 403


@pytest.fixture
async def mcp_sidecar(config: ConfigFactory, start_sidecar: SidecarStarter, mcp_upstream: str) -> RunningSidecar:
    return await start_sidecar(config.settings({"proxy": {"upstream": mcp_upstream}}))


async def test_sdk_session_cannot_be_taken_over_with_a_respelled_id(mcp_sidecar: RunningSidecar) -> None:
    _, owner = await mcp_sidecar.create_key("owner")
    _, intruder = await mcp_sidecar.create_key("intruder")
    async with mcp_client(mcp_url(mcp_sidecar.proxy_url), token=owner, mode="legacy") as client:
        await client.call_tool("add", {"a": 1, "b": 2})
        [session_id] = {k for k, v in (await _sessions(mcp_sidecar)).items() if v}
        body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                           "params": {"name": "whoami", "arguments": {}}}).encode()
        # Raw bytes: HTTP client libraries refuse to send the whitespace an attacker would.
        for spelling in (f"{session_id} ", f" {session_id}", f"{session_id}\t"):
            for method in ("POST", "GET", "DELETE"):
                headers = [("Authorization", f"Bearer {intruder}"), ("Mcp-Session-Id", spelling),
                           ("MCP-Protocol-Version", "2025-11-25"), ("Content-Type", "application/json"),
                           ("Accept", "application/json, text/event-stream")]
                raw = await exchange(mcp_sidecar.proxy_port,
                                     http_request(method, "/mcp", headers, body if method == "POST" else b""))
                assert [r.status for r in parse_responses(raw)] == [403], (spelling, method)
        # The owner's session still works, and is still the owner's.
        assert (await client.call_tool("add", {"a": 2, "b": 2})).structured_content == {"result": 4}
    assert set((await _sessions(mcp_sidecar)).values()) <= {await _key_id(mcp_sidecar, "owner")}


async def _sessions(sidecar: RunningSidecar) -> dict[str, str]:
    store = sidecar.services.store
    rows: dict[str, str] = {}
    db = store.db  # type: ignore[attr-defined]
    async with db.execute("SELECT session_id, key_id FROM session_bindings") as cur:
        for session_id, key_id in await cur.fetchall():
            rows[str(session_id)] = str(key_id)
    return rows


async def _key_id(sidecar: RunningSidecar, name: str) -> str:
    return next(k.id for k in await sidecar.services.keys.list() if k.name == name)


# --- expiry cuts open streams -------------------------------------------------------------------


async def test_an_expired_keys_open_stream_is_cut_within_a_second_with_an_audit_event(
        sidecar: RunningSidecar) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    record, key = await sidecar.create_key("short-lived", expires_at=to_rfc3339(expires))
    events = 0
    async with client_session() as http, http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(key)) as resp:
        assert resp.status == 200
        try:
            async for _ in resp.content:
                events += 1
        except Exception:  # noqa: S110 - the cut may surface as a payload error; timing is what counts
            pass
        ended = datetime.now(UTC)
    assert events > 0
    assert ended >= expires - timedelta(milliseconds=50)
    assert ended - expires < timedelta(seconds=1), ended - expires

    async def expired_events() -> list[AuditRecord]:
        return [e for e in await sidecar.services.store.list_audit("acme", 50, None) if e.action == "key.expired"]

    expired = await eventually(expired_events)
    assert [(e.key_id, e.key_name) for e in expired] == [(record.id, "short-lived")]
    # Exactly one event per expiry, however often housekeeping runs (it runs every second).
    await asyncio.sleep(1.2)
    audit = await sidecar.services.store.list_audit("acme", 50, None)
    assert len([e for e in audit if e.action == "key.expired"]) == 1


# --- keys in the query string, any encoding depth ---------------------------------------------


_ENCODINGS: list[Callable[[str], str]] = [
    lambda k: k,
    lambda k: k.replace("_", "%5F"),
    lambda k: k.replace("_", "%255F"),
    lambda k: k.replace("_", "%25255F"),
    lambda k: "".join(f"%{ord(c):02X}" for c in k),
    lambda k: "".join(f"%25{ord(c):02X}" for c in k),
    lambda k: k[:-1],                      # the checksum's last digit left off: still the secret
    lambda k: k[:44],                      # lookup id and the whole secret
    lambda k: "TAK_" + k[4:],              # folded by a component on the way
]


@pytest.mark.parametrize("encode", _ENCODINGS)
async def test_a_key_in_the_query_is_refused_at_any_encoding_depth(
        sidecar: RunningSidecar, echo: RecordingUpstream, encode: Callable[[str], str]) -> None:
    _, key = await sidecar.create_key()
    target = f"/mcp?api_key={encode(key)}"
    # Raw bytes: the target reaches the sidecar exactly as written.
    resp = await raw_request(sidecar.proxy_port, "GET", target, [("Authorization", f"Bearer {key}")])
    assert resp.status == 400
    body = resp.json()
    assert body["error"] == "invalid_request"
    assert key not in json.dumps(body)
    assert echo.requests == []


# --- htu with an upstream base path ------------------------------------------------------------


async def test_htu_is_the_path_the_upstream_receives_behind_a_base_path(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    settings = config.settings({"proxy": {"upstream": echo.url + "/base/prefix"}})
    running = await start_sidecar(settings)
    _, key = await running.create_key()
    async with client_session() as http, http.post(running.proxy_url + "/mcp?x=1", headers=bearer(key),
                                                   data=b"{}") as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert seen["path_qs"] == "/base/prefix/mcp?x=1"
    assertion = next(v for k, v in seen["headers"] if k.lower() == "x-toolio-assertion")
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["htu"] == "/base/prefix/mcp?x=1"
    assert claims["htm"] == "POST"


async def test_a_session_id_that_is_not_visible_ascii_is_unknown_not_a_store_fault(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_sidecar(hardening_settings(tmp_path, upstream.url)) as sidecar:
        _, alice = await sidecar.create_key("alice")
        for raw_id in (b"abc\xe9", b"\xa0abc", b"a\x7fb"):
            head = (b"POST /mcp HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + alice.encode()
                    + b"\r\nMcp-Session-Id: " + raw_id + b"\r\nContent-Length: 2\r\n\r\n{}")
            [response] = parse_responses(await exchange(sidecar.proxy_port, head))
            assert response.status in (400, 404), raw_id  # llhttp refuses some bytes outright
            assert response.status != 503
        assert upstream.completed == []


async def test_a_refused_presenter_does_not_keep_anothers_binding_alive(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url, proxy={"session_binding_ttl_seconds": 1},
                                  auth={"last_used_flush_seconds": 0.1})
    async with running_sidecar(settings) as sidecar:
        _, alice = await sidecar.create_key("alice")
        _, mallory = await sidecar.create_key("mallory")
        _, session, _ = await _call(sidecar, alice)
        for _ in range(8):  # 2.4 s of refused use by Mallory: the binding lapses anyway
            assert (await _call(sidecar, mallory, session))[0] in (403, 404)
            await asyncio.sleep(0.3)
        await eventually(lambda: _status_of(sidecar, mallory, session, 404), within=5)


async def _status_of(sidecar: RunningSidecar, key: str, session: str, want: int) -> bool:
    return (await _call(sidecar, key, session))[0] == want
