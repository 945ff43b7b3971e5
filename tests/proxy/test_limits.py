"""Limits per key on the proxy (docs/reference/limits.md): a key's rate limit from its roles,
the RateLimit fields of draft-ietf-httpapi-ratelimit-headers-10 on its answers, 429 beyond it,
its requests in flight bounded, and one key's traffic never refusing another's. Every test runs
with the count in this process and with it shared in a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from sidecar.gate.quota import REDIS_PREFIX, Quota
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import LimitsSettings, RateLimit, SettingsError, parse_rate_limit
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.metrics import sample
from tests.support.processes import Deployment, serving
from tests.support.raw import closed_port
from tests.support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(60)

METERED = {"metered": {"description": "An agent with a budget", "permissions": ["plans:read"],
                       "rate_limit": "3/minute"}}
_RATELIMIT = re.compile(r'"key";r=(\d+);t=(\d+)')


@pytest.fixture(params=["memory", "redis"])
def limits(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    redis_url: str = request.getfixturevalue("redis_url")
    return {"redis_url": redis_url}


async def _start(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
                 limits: dict[str, Any], **proxy: Any) -> RunningSidecar:
    return await start_sidecar(config.settings({
        "proxy": {"upstream": echo.url, **proxy}, "roles": METERED, "limits": limits}))


async def _post(http: aiohttp.ClientSession, sidecar: RunningSidecar, key: str,
                path: str = "/mcp") -> tuple[int, dict[str, str], Any]:
    async with http.post(sidecar.proxy_url + path, data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                         headers={**bearer(key), "Content-Type": "application/json"}) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_a_key_gets_its_roles_rate_limit_with_ratelimit_fields_then_429(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        limits: dict[str, Any]) -> None:
    sidecar = await _start(config, start_sidecar, echo, limits)
    _, key = await sidecar.create_key(roles=["metered"])
    async with client_session() as http:
        remaining = []
        for _ in range(3):
            status, headers, _ = await _post(http, sidecar, key)
            assert status == 200
            assert headers["RateLimit-Policy"] == '"key";q=3;w=60'
            match = _RATELIMIT.fullmatch(headers["RateLimit"])
            assert match is not None, headers["RateLimit"]
            remaining.append(int(match.group(1)))
            assert 0 < int(match.group(2)) <= 60
        assert remaining == [2, 1, 0]
        status, headers, body = await _post(http, sidecar, key)
    assert status == 429
    assert body["error"] == "rate_limit_exceeded"
    assert "3/minute" in body["error_description"]
    # One request more is allowed after a third of the window: 20 s (rounded up, at most 20).
    assert 1 <= int(headers["Retry-After"]) <= 20
    assert headers["RateLimit-Policy"] == '"key";q=3;w=60'
    assert _RATELIMIT.fullmatch(headers["RateLimit"]) is not None
    assert headers["RateLimit"].startswith('"key";r=0;')
    assert headers["Content-Type"] == "application/json"
    assert len(echo.requests) == 3  # the refused request never reached the upstream
    assert sample(sidecar.services.registry, "toolio_sidecar_limited_requests_total", reason="rate") == 1


async def test_one_keys_spent_limit_never_refuses_another_key(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        limits: dict[str, Any]) -> None:
    sidecar = await _start(config, start_sidecar, echo, limits)
    _, spender = await sidecar.create_key("spender", roles=["metered"])
    _, sibling = await sidecar.create_key("sibling", roles=["metered"])
    _, unlimited = await sidecar.create_key("free", roles=["viewer"])
    async with client_session() as http:
        statuses = [(await _post(http, sidecar, spender))[0] for _ in range(6)]
        assert statuses == [200, 200, 200, 429, 429, 429]
        status, headers, _ = await _post(http, sidecar, sibling)
        assert status == 200 and headers["RateLimit"].startswith('"key";r=2;')
        for _ in range(10):
            status, headers, _ = await _post(http, sidecar, unlimited)
            assert status == 200
            assert "RateLimit" not in headers and "RateLimit-Policy" not in headers


async def test_the_most_generous_role_wins_and_a_role_without_a_limit_means_none(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    roles = {**METERED, "burst": {"description": "More", "permissions": [], "rate_limit": "10/second"}}
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url}, "roles": roles}))
    _, both_limited = await sidecar.create_key("two", roles=["metered", "burst"])
    _, one_unlimited = await sidecar.create_key("free", roles=["metered", "viewer"])
    async with client_session() as http:
        status, headers, _ = await _post(http, sidecar, both_limited)
        assert status == 200 and headers["RateLimit-Policy"] == '"key";q=10;w=1'
        for _ in range(5):
            status, headers, _ = await _post(http, sidecar, one_unlimited)
            assert status == 200 and "RateLimit" not in headers


async def test_a_keys_own_limit_replaces_its_roles_at_its_next_request(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        limits: dict[str, Any]) -> None:
    sidecar = await _start(config, start_sidecar, echo, limits)
    record, key = await sidecar.create_key(roles=["viewer"])  # unlimited by its roles
    keys = sidecar.services.keys
    async with client_session() as http:
        status, headers, _ = await _post(http, sidecar, key)
        assert status == 200 and "RateLimit" not in headers  # cached now, unlimited
        await keys.set_rate_limit(record.id, "2/hour", actor="test", client=None)
        statuses = [(await _post(http, sidecar, key))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        await keys.set_rate_limit(record.id, "unlimited", actor="test", client=None)
        status, headers, _ = await _post(http, sidecar, key)
        assert status == 200 and "RateLimit" not in headers
        # A metered role's key with its own "unlimited" is never limited.
        metered, metered_key = await sidecar.create_key("metered", roles=["metered"])
        await keys.set_rate_limit(metered.id, "unlimited", actor="test", client=None)
        assert [(await _post(http, sidecar, metered_key))[0] for _ in range(5)] == [200] * 5


async def test_a_streamed_answer_carries_the_ratelimit_fields_too(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        limits: dict[str, Any]) -> None:
    sidecar = await _start(config, start_sidecar, echo, limits)
    _, key = await sidecar.create_key(roles=["metered"])
    async with client_session() as http, \
            http.get(sidecar.proxy_url + "/sse?events=2&interval=0", headers=bearer(key)) as resp:
        assert resp.status == 200
        assert resp.headers["RateLimit"].startswith('"key";r=2;')
        assert (await resp.read()).count(b"data: event") == 2


async def test_a_key_at_its_bound_of_open_streams_gets_429_and_another_key_is_untouched(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        limits: dict[str, Any]) -> None:
    sidecar = await _start(config, start_sidecar, echo, limits, max_concurrent_requests_per_key=2)
    _, hog = await sidecar.create_key("hog")
    _, other = await sidecar.create_key("other")
    async with client_session() as http:
        streams = [await http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(hog)) for _ in range(2)]
        try:
            for stream in streams:
                assert stream.status == 200
                await stream.content.readuntil(b"\n\n")
            status, headers, body = await _post(http, sidecar, hog)
            assert status == 429
            assert body["error"] == "too_many_requests_in_flight"
            assert headers["Retry-After"] == "1"
            assert sample(sidecar.services.registry, "toolio_sidecar_limited_requests_total",
                          reason="concurrency") == 1
            # Another key still has the whole pool.
            other_streams = [await http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(other))
                             for _ in range(2)]
            try:
                assert [s.status for s in other_streams] == [200, 200]
                assert (await _post(http, sidecar, other))[0] == 429  # its own bound, not hog's
            finally:
                for s in other_streams:
                    s.close()
        finally:
            streams[0].close()
        # One stream ended: the key may make a request again.
        async def after_close() -> int:
            for _ in range(100):
                status = (await _post(http, sidecar, hog))[0]
                if status == 200:
                    return status
                await asyncio.sleep(0.02)
            return status
        assert await after_close() == 200
        streams[1].close()


async def test_no_bound_when_max_concurrent_requests_per_key_is_zero(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url,
                                                             "max_concurrent_requests_per_key": 0}}))
    _, key = await sidecar.create_key()
    async with client_session() as http:
        streams = [await http.get(sidecar.proxy_url + "/sse-forever", headers=bearer(key)) for _ in range(5)]
        try:
            assert [s.status for s in streams] == [200] * 5
            assert (await _post(http, sidecar, key))[0] == 200
        finally:
            for s in streams:
                s.close()


@pytest.mark.parametrize(("failure", "status"), [("open", 200), ("closed", 503)])
async def test_an_unreachable_redis_lets_through_or_refuses_as_configured(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
        failure: str, status: int) -> None:
    dead = f"redis://127.0.0.1:{closed_port()}/0"
    sidecar = await _start(config, start_sidecar, echo, {"redis_url": dead, "redis_failure": failure})
    _, key = await sidecar.create_key(roles=["metered"])
    _, free = await sidecar.create_key("free", roles=["viewer"])
    async with client_session() as http:
        got, headers, body = await _post(http, sidecar, key)
        assert got == status
        if failure == "closed":
            assert body["error"] == "limits_unavailable" and headers["Retry-After"] == "1"
        else:
            # Counted here instead: the key's limit still holds on this replica.
            statuses = [(await _post(http, sidecar, key))[0] for _ in range(3)]
            assert statuses == [200, 200, 429]
        # A key without a limit never asks Redis.
        assert (await _post(http, sidecar, free))[0] == 200
    outcome = "refused" if failure == "closed" else "allowed"
    assert sample(sidecar.services.registry, "toolio_sidecar_limits_backend_errors_total", outcome=outcome) >= 1


# -- the counter itself -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "redis"])
async def test_gcra_allows_the_whole_count_at_once_then_one_per_interval(
        mode: str, request: pytest.FixtureRequest) -> None:
    settings = LimitsSettings(redis_url=request.getfixturevalue("redis_url") if mode == "redis" else "")
    quota = Quota(settings, Metrics(CollectorRegistry()), JsonLog(level="error"))
    subject = f"key_gcra_{mode}_{id(quota)}"
    limit = RateLimit(5, "second")  # an interval of 200 ms
    try:
        verdicts = [await quota.take(subject, limit) for _ in range(6)]
        assert [v.allowed for v in verdicts] == [True] * 5 + [False]
        assert verdicts[5].retry_after == 1
        await asyncio.sleep(0.25)  # one interval: exactly one more
        assert (await quota.take(subject, limit)).allowed
        assert not (await quota.take(subject, limit)).allowed
    finally:
        await quota.close()


async def test_checks_sent_together_to_redis_each_count_and_a_lost_script_is_loaded_again(redis_url: str) -> None:
    # Concurrent checks leave in one pipeline; each is its own atomic script run, so exactly the
    # limit gets through. Redis forgetting its scripts (a restart, SCRIPT FLUSH) costs nothing.
    quota = Quota(LimitsSettings(redis_url=redis_url), Metrics(CollectorRegistry()), JsonLog(level="error"))
    client = redis.asyncio.Redis.from_url(redis_url)
    subject = f"key_batch_{uuid.uuid4().hex}"
    limit = RateLimit(10, "minute")
    try:
        verdicts = await asyncio.gather(*(quota.take(subject, limit) for _ in range(50)))
        assert sum(v.allowed for v in verdicts) == 10
        assert sorted(v.fields[1][1].split(";")[1] for v in verdicts if v.allowed) == sorted(
            f"r={n}" for n in range(10))
        await client.script_flush()
        other = f"{subject}-2"
        assert (await quota.take(other, limit)).allowed
        assert (await client.exists(REDIS_PREFIX + other)) == 1  # counted in Redis, not in memory
    finally:
        await client.aclose()
        await quota.close()


async def test_two_sidecar_processes_sharing_redis_enforce_one_limit_together(
        tmp_path: Path, echo: RecordingUpstream, redis_url: str) -> None:
    # Two `serve` processes on one SQLite file: the same key is valid on both, as replicas on
    # one store are; only Redis joins their counts.
    shared = {"data_dir": str(tmp_path / "data"), "roles": METERED, "limits": {"redis_url": redis_url}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Deployment(tmp_path / "a", echo.url, shared)
    b = Deployment(tmp_path / "b", echo.url, shared)
    async with serving(a), serving(b), client_session() as http:
        key = (await a.create_key("agent", "metered"))["key"]
        statuses = []
        for url in (a.proxy_url, b.proxy_url) * 3:
            async with http.post(url + "/mcp", data=b"{}", headers=bearer(key)) as resp:
                statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429, 429]


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["600/minute", "1/second", "999999999/hour"])
def test_rate_limits_are_read_as_count_per_unit(text: str) -> None:
    assert str(parse_rate_limit(text)) == text


@pytest.mark.parametrize("text", ["0/minute", "10/day", "10 / minute", "-1/second", "1.5/second", "ten/minute",
                                  "1000000000/second", "10/Minute", ""])
def test_a_bad_rate_limit_in_a_role_names_the_setting(config: ConfigFactory, text: str) -> None:
    with pytest.raises(SettingsError) as caught:
        config.settings({"roles": {"viewer": {"description": "", "permissions": [], "rate_limit": text}}})
    assert caught.value.key == "roles.viewer.rate_limit"


def test_bad_limits_settings_name_the_setting_and_never_echo_a_password(config: ConfigFactory) -> None:
    with pytest.raises(SettingsError) as caught:
        config.settings({"limits": {"redis_url": "http://user:s3cret@host/0"}})
    assert caught.value.key == "limits.redis_url" and "s3cret" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        config.settings({"limits": {"redis_failure": "sometimes"}})
    assert caught.value.key == "limits.redis_failure"
    with pytest.raises(SettingsError) as caught:
        config.settings({"proxy": {"max_concurrent_requests_per_key": -1}})
    assert caught.value.key == "proxy.max_concurrent_requests_per_key"
    settings = config.settings({"limits": {"redis_url": "redis://:pw@cache:6379/2"}})
    assert "pw" not in repr(settings.limits)


def test_the_redis_url_may_come_from_the_environment(config: ConfigFactory) -> None:
    settings = config.settings({}, environ={"TOOLIO_SIDECAR_REDIS_URL": "redis://cache:6379/0"})
    assert settings.limits.shared and settings.limits.redis_url == "redis://cache:6379/0"
    assert json.dumps(str(settings.limits)).count("cache") == 0
