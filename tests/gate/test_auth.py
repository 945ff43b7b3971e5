"""Authentication through the running proxy (docs/reference/keys.md, 3): the RFC 6750 answers, disable /
enable from this process and from the CLI in another process, rate limits, and where the
full key must never end up (the SQLite files, the logs, error bodies)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.errors import MalformedCredentials, MissingCredentials
from sidecar.gate.authenticator import bearer_token
from sidecar.keys.format import generate_key
from sidecar.keys.manager import KeyManager, new_key_id
from sidecar.keys.records import ENABLED, KeyRecord, utcnow
from sidecar.logs import JsonLog
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.metrics import sample
from tests.support.polling import eventually
from tests.support.processes import run_cli
from tests.support.upstreams import RecordingUpstream

EXACT_CHALLENGE = 'Bearer realm="toolio"'


async def _get(sidecar: RunningSidecar, path: str = "/mcp", headers: Any = None,
               local_addr: tuple[str, int] | None = None) -> tuple[int, CIMultiDict[str], str]:
    connector = aiohttp.TCPConnector(local_addr=local_addr) if local_addr else None
    async with aiohttp.ClientSession(trust_env=False, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http, \
            http.get(sidecar.proxy_url + path, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.text()


def _challenge_error(header: str | None) -> str | None:
    if header is None:
        return None
    for part in header.removeprefix("Bearer ").split(", "):
        name, _, value = part.partition("=")
        if name == "error":
            return value.strip('"')
    return None


async def _status_with(sidecar: RunningSidecar, key: str) -> int:
    status, _, _ = await _get(sidecar, headers=bearer(key))
    return status


async def _poll_status(sidecar: RunningSidecar, key: str, want: int, seconds: float | None = None) -> float:
    """Poll until a request with ``key`` answers ``want``; return the time it took. With
    ``seconds``, taking that long fails (the documented bound, measured, not slept)."""
    started = time.monotonic()

    async def answered() -> bool:
        return await _status_with(sidecar, key) == want

    await eventually(answered, interval=0.05, what=f"status {want}")
    elapsed = time.monotonic() - started
    assert seconds is None or elapsed < seconds, f"{want} only after {elapsed:.2f} s (bound {seconds} s)"
    return elapsed


# -- RFC 6750 -----------------------------------------------------------------------------------


async def test_request_without_authorization_gets_a_bare_bearer_challenge(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    status, headers, body = await _get(sidecar)
    assert status == 401
    assert headers.getall("WWW-Authenticate") == [EXACT_CHALLENGE]
    assert headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert set(data) == {"error", "error_description"}
    assert echo.requests == []


@pytest.mark.parametrize("case", ["basic", "bearer-without-token", "token-with-space", "two-headers",
                                  "query-access-token", "query-key-only"])
async def test_malformed_credentials_are_invalid_request(sidecar: RunningSidecar, echo: RecordingUpstream,
                                                         case: str) -> None:
    _, key = await sidecar.create_key()
    path = "/mcp"
    headers: CIMultiDict[str] = CIMultiDict()
    if case == "basic":
        headers.add("Authorization", "Basic dXNlcjpwYXNz")
    elif case == "bearer-without-token":
        headers.add("Authorization", "Bearer")
    elif case == "token-with-space":
        headers.add("Authorization", f"Bearer {key} extra")
    elif case == "two-headers":
        headers.add("Authorization", f"Bearer {key}")
        headers.add("Authorization", f"Bearer {key}")
    elif case == "query-access-token":
        headers.add("Authorization", f"Bearer {key}")
        path = f"/mcp?access_token={key}"
    else:
        path = f"/mcp?token={key}"
    status, resp_headers, body = await _get(sidecar, path, headers)
    assert status == 400
    challenge = resp_headers.get("WWW-Authenticate")
    assert challenge is not None
    assert challenge.startswith('Bearer realm="toolio"')
    assert _challenge_error(challenge) == "invalid_request"
    data = json.loads(body)
    assert data["error"] == "invalid_request"
    assert set(data) == {"error", "error_description"}
    assert key not in body
    assert key[4:] not in challenge
    assert echo.requests == []


async def _insert(sidecar: RunningSidecar, *, expires_at: datetime | None = None,
                  workspace: str | None = None) -> tuple[KeyRecord, str]:
    """A key written straight to the store, for states the API will not create (expired)."""
    key = generate_key()
    record = KeyRecord(
        id=new_key_id(), lookup_id=key.lookup_id, name=f"direct-{key.lookup_id}", roles=("viewer",),
        workspace=workspace or sidecar.settings.workspace, status=ENABLED, created_at=utcnow(),
        created_by="test", key_hash=sidecar.services.hasher.hash(key.full), expires_at=expires_at,
    )
    return await sidecar.services.store.insert_key(record, []), key.full


@pytest.mark.parametrize("case", ["unknown", "wrong-secret", "bad-checksum", "not-a-key", "disabled",
                                  "expired", "other-workspace"])
async def test_unusable_keys_are_invalid_token(config: ConfigFactory, sidecar: RunningSidecar,
                                               echo: RecordingUpstream, case: str) -> None:
    record, good = await sidecar.create_key()
    if case == "unknown":
        token = generate_key().full
    elif case == "wrong-secret":
        token = generate_key(record.lookup_id).full  # valid checksum, same lookup id
    elif case == "bad-checksum":
        token = good[:-1] + ("A" if good[-1] != "A" else "B")
    elif case == "not-a-key":
        token = "sk-live-0123456789"
    elif case == "disabled":
        await sidecar.disable(record.id)
        token = good
    elif case == "expired":
        _, token = await _insert(sidecar, expires_at=utcnow() - timedelta(seconds=1))
    else:
        other = config.settings({"workspace": "globex"})
        manager = KeyManager(other, sidecar.services.store, sidecar.services.hasher, sidecar.services.audit)
        _, token = await manager.create(name="theirs", roles=["viewer"], actor="test", client=None)
    status, headers, body = await _get(sidecar, headers=bearer(token))
    assert status == 401
    challenge = headers.get("WWW-Authenticate")
    assert challenge is not None
    assert challenge.startswith('Bearer realm="toolio"')
    assert _challenge_error(challenge) == "invalid_token"
    data = json.loads(body)
    assert data["error"] == "invalid_token"
    assert set(data) == {"error", "error_description"}
    assert token not in body
    assert token not in challenge
    assert echo.requests == []


async def test_valid_key_reaches_the_upstream_and_is_cached(sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    for _ in range(3):
        assert await _status_with(sidecar, key) == 200
    assert len(echo.requests) == 3
    registry = sidecar.services.registry
    assert sample(registry, "toolio_sidecar_cache_misses_total") == 1
    assert sample(registry, "toolio_sidecar_cache_hits_total") == 2


async def test_lower_case_scheme_is_accepted(sidecar: RunningSidecar) -> None:
    _, key = await sidecar.create_key()
    status, _, _ = await _get(sidecar, headers={"Authorization": f"bearer {key}"})
    assert status == 200


async def test_key_expiring_while_cached_is_refused(sidecar: RunningSidecar) -> None:
    expires = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    _, key = await sidecar.create_key(expires_at=expires)
    assert await _status_with(sidecar, key) == 200  # verified and cached
    await _poll_status(sidecar, key, 401)


def test_bearer_token_parsing_follows_rfc_6750() -> None:
    def request(*values: str, path: str = "/mcp") -> Any:
        headers = CIMultiDict(("Authorization", v) for v in values)
        return make_mocked_request("GET", path, headers=headers)

    assert bearer_token(request("Bearer abc")) == "abc"
    assert bearer_token(request("BEARER abc")) == "abc"
    with pytest.raises(MissingCredentials):
        bearer_token(request())
    for bad in ("Bearer", "Bearer ", "Bearer  abc", "Bearer abc ", "Token abc", "abc"):
        with pytest.raises(MalformedCredentials):
            bearer_token(request(bad))
    with pytest.raises(MalformedCredentials):
        bearer_token(request("Bearer a", "Bearer a"))
    with pytest.raises(MalformedCredentials):
        bearer_token(request("Bearer a", path="/mcp?access_token=a"))


# -- disable / enable ---------------------------------------------------------------------------


async def test_disabled_key_is_rejected_on_next_request(sidecar: RunningSidecar) -> None:
    record, key = await sidecar.create_key()
    _, other = await sidecar.create_key("other")
    assert await _status_with(sidecar, key) == 200  # now in the verified-key cache
    assert await _status_with(sidecar, other) == 200
    await sidecar.disable(record.id)
    assert await _status_with(sidecar, key) == 401
    assert await _status_with(sidecar, other) == 200
    await sidecar.enable(record.id)
    assert await _status_with(sidecar, key) == 200


async def test_cli_disable_from_another_process_is_noticed_within_one_second(
        config: ConfigFactory, sidecar: RunningSidecar) -> None:
    path = config.write({"proxy": {"upstream": sidecar.settings.proxy.upstream}})
    record, key = await sidecar.create_key()
    assert await _status_with(sidecar, key) == 200
    result = await run_cli("keys", "disable", "--config", str(path), record.id)
    assert result.returncode == 0, result.stderr
    await _poll_status(sidecar, key, 401, seconds=1.0)
    result = await run_cli("keys", "enable", "--config", str(path), record.id)
    assert result.returncode == 0, result.stderr
    await _poll_status(sidecar, key, 200, seconds=1.0)


async def test_disabling_a_key_closes_its_open_stream_within_one_second(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key()
    async with client_session() as http, http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(key)) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await sidecar.disable(record.id)
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):  # noqa: PT012 - read until the cut
            async with asyncio.timeout(1.0):
                while True:
                    if not await resp.content.readany():
                        break
        assert time.monotonic() - started < 1.0
    await asyncio.wait_for(echo.sse_closed.wait(), 1.0)


# -- rate limits --------------------------------------------------------------------------------


async def test_repeated_failures_from_one_address_get_429_but_others_are_unaffected(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url},
                                                   "auth": {"failures_per_minute_per_address": 3}}))
    _, cached = await sidecar.create_key("cached")
    _, fresh = await sidecar.create_key("fresh")
    assert await _status_with(sidecar, cached) == 200
    for _ in range(3):
        assert await _status_with(sidecar, generate_key().full) == 401
    status, headers, body = await _get(sidecar, headers=bearer(generate_key().full))
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"] == "rate_limited"
    # A key this sidecar already verified keeps working from the same address...
    assert await _status_with(sidecar, cached) == 200
    # ...and a client at another address is not limited at all.
    status, _, _ = await _get(sidecar, headers=bearer(fresh), local_addr=("127.0.0.2", 0))
    assert status == 200


async def test_hammering_one_lookup_id_does_not_lock_out_its_verified_key(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url},
                                                   "auth": {"failures_per_minute_per_lookup_id_total": 2}}))
    record, key = await sidecar.create_key()
    assert await _status_with(sidecar, key) == 200
    statuses = []
    for n in range(4):  # wrong secrets for the same lookup id from two addresses, taking turns
        status, _, _ = await _get(sidecar, headers=bearer(generate_key(record.lookup_id).full),
                                  local_addr=(f"127.0.0.{10 + n % 2}", 0))
        statuses.append(status)
    assert statuses[:2] == [401, 401]
    assert statuses[2:] == [429, 429]
    assert await _status_with(sidecar, key) == 200


async def test_failed_attempts_are_audited_in_aggregate(sidecar: RunningSidecar) -> None:
    record, _ = await sidecar.create_key()
    for _ in range(4):
        await _status_with(sidecar, generate_key(record.lookup_id).full)
    await sidecar.services.audit.flush_failures(everything=True)
    events = [e for e in await sidecar.services.store.list_audit("acme", 50, None) if e.action == "auth.failed"]
    assert len(events) == 1
    assert events[0].details["count"] == 4
    assert events[0].details["lookup_id"] == record.lookup_id
    assert events[0].client == "127.0.0.1"


async def test_last_used_is_recorded_after_a_successful_request(sidecar: RunningSidecar) -> None:
    record, key = await sidecar.create_key()
    assert record.last_used_at is None
    before = utcnow()
    assert await _status_with(sidecar, key) == 200
    await sidecar.services.flush_last_used()
    stored = await sidecar.services.store.get_key(record.id)
    assert stored is not None
    assert stored.last_used_at is not None
    assert stored.last_used_at >= before - timedelta(seconds=1)


# -- where the key must never be ----------------------------------------------------------------


async def test_full_key_never_reaches_the_database_files_or_the_logs(
        sidecar: RunningSidecar, echo: RecordingUpstream) -> None:
    record, key = await sidecar.create_key("secretive", ["viewer", "writer"])
    assert await _status_with(sidecar, key) == 200
    assert await _status_with(sidecar, generate_key(record.lookup_id).full) == 401
    assert await _status_with(sidecar, key[:-1] + ("x" if key[-1] != "x" else "y")) == 401
    await _get(sidecar, f"/mcp?access_token={key}", bearer(key))
    await _get(sidecar, "/mcp", {"Authorization": f"Basic {key}"})
    await sidecar.disable(record.id)
    assert await _status_with(sidecar, key) == 401
    await sidecar.services.flush()
    sidecar.services.log.flush()

    secret = key[12:44]
    data_dir = sidecar.settings.data_dir
    files = [p for p in data_dir.iterdir() if p.name.startswith("sidecar.db")]
    assert {p.name for p in files} >= {"sidecar.db", "sidecar.db-wal", "sidecar.db-shm"}
    for path in files:
        content = path.read_bytes()
        assert key.encode() not in content, path.name
        assert secret.encode() not in content, path.name
    assert record.lookup_id.encode() in b"".join(p.read_bytes() for p in files)  # we did look at the data

    log = sidecar.log_stream.getvalue()
    lines = sidecar.log_lines()
    assert [line["status"] for line in lines if line["type"] == "access"] == [200, 401, 401, 400, 400, 401]
    assert any(line.get("action") == "key.created" for line in lines)
    assert key not in log
    assert secret not in log
    assert all(key not in r.body.decode() and key not in str(r.headers) for r in echo.requests)


def test_log_lines_scrub_anything_shaped_like_a_key() -> None:
    stream = io.StringIO()
    key = generate_key().full
    JsonLog(stream=stream).info("oops", detail=f"token={key}")
    line = json.loads(stream.getvalue())
    assert key not in stream.getvalue()
    assert line["detail"] == f"token={key[:8]}..."


async def test_a_query_that_merely_mentions_tak_is_not_taken_for_a_key(sidecar: RunningSidecar,
                                                                       echo: RecordingUpstream) -> None:
    _, key = await sidecar.create_key()
    headers: CIMultiDict[str] = CIMultiDict({"Authorization": f"Bearer {key}"})
    status, _, _ = await _get(sidecar, "/mcp?q=tak_docs", headers)
    assert status == 200
    assert len(echo.requests) == 1
