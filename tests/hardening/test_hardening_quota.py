"""Attacks on the per-key limits (docs/reference/limits.md): rate limits counted in this process
or in Redis, and the bound on a key's requests in flight. Each test is a way one key's traffic,
a fault of Redis, or a client's behaviour could let more through than a key's limit, or refuse
requests that are within theirs (another key's above all).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from sidecar.gate import quota as quota_module
from sidecar.gate.quota import REDIS_EPOCH, REDIS_PREFIX, Quota
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import LimitsSettings, RateLimit, SettingsError, parse_rate_limit
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.raw import LOOPBACK, closed_port, http_request, parse_responses
from tests.support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(60)

GENEROUS = {"generous": {"description": "A large budget", "permissions": ["plans:read"],
                         "rate_limit": "100000/second"}}
METERED = {"metered": {"description": "An agent with a budget", "permissions": ["plans:read"],
                       "rate_limit": "3/minute"}}
PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'


@pytest.fixture(params=["memory", "redis"])
def limits(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Rate limits counted in this process, or shared in a real Redis."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url")}


async def _open(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return list(await asyncio.gather(*(asyncio.open_connection(LOOPBACK, port) for _ in range(count))))


async def _statuses_at_once(sidecar: RunningSidecar, keys: list[str]) -> list[int]:
    """One request per key in ``keys``, each on its own connection, all sent in one go so that
    they are handled together; the statuses in order."""
    connections = await _open(sidecar.proxy_port, len(keys))
    try:
        for (_, writer), key in zip(connections, keys, strict=True):
            writer.write(http_request("POST", "/mcp", [("Authorization", f"Bearer {key}"),
                                                       ("Content-Type", "application/json")], PING))
        answers = await asyncio.gather(*(reader.read() for reader, _ in connections))
    finally:
        for _, writer in connections:
            writer.close()
    return [parse_responses(answer)[0].status for answer in answers]


async def test_a_burst_of_requests_within_their_limits_is_never_refused_by_the_shared_counter(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream, redis_url: str) -> None:
    # More checks at once than the Redis client holds connections must wait for one, not fail:
    # with redis_failure = "closed" a failed check is a 503 for every limited key, for a second.
    # Five keys, each within its own bound on requests in flight (64) and its rate limit.
    sidecar = await start_sidecar(config.settings({
        "proxy": {"upstream": echo.url}, "roles": GENEROUS,
        # A timeout no busy test machine reaches: the pool's refusal was immediate.
        "limits": {"redis_url": redis_url, "redis_failure": "closed", "redis_timeout_seconds": 5}}))
    crowd = [(await sidecar.create_key(f"crowd{i}", roles=["generous"]))[1] for i in range(5)]
    _, bystander = await sidecar.create_key("bystander", roles=["generous"])
    statuses = await _statuses_at_once(sidecar, [key for key in crowd for _ in range(60)] + [bystander])
    assert statuses == [200] * 301
    assert (await _statuses_at_once(sidecar, [bystander])) == [200]


async def test_redis_clock_stepping_back_never_locks_a_key_out_for_longer_than_its_period(redis_url: str) -> None:
    # The shared count's times are Redis's clock (TIME). If that clock steps back (an NTP step,
    # a restored VM), the stored TAT lies further ahead than GCRA can ever put it: at most one
    # period. Read as it is, it would refuse the key for as long as the clock stepped back.
    quota = Quota(LimitsSettings(redis_url=redis_url), Metrics(CollectorRegistry()), JsonLog(level="error"))
    client = redis.asyncio.Redis.from_url(redis_url)
    subject = f"key_clockstep_{uuid.uuid4().hex}"
    limit = RateLimit(600, "minute")
    try:
        seconds, micros = await client.time()
        an_hour_ahead = (seconds - REDIS_EPOCH + 3600) * 1_000_000 + micros
        await client.set(REDIS_PREFIX + subject, str(an_hour_ahead), px=7_200_000)
        verdict = await quota.take(subject, limit)
        assert not verdict.allowed  # the allowance is spent, but only just:
        assert verdict.retry_after == 1
        assert verdict.fields[1] == ("RateLimit", '"key";r=0;t=60')
    finally:
        await client.delete(REDIS_PREFIX + subject)
        await client.aclose()
        await quota.close()


async def test_an_error_answer_after_a_key_spent_its_allowance_carries_the_ratelimit_fields(
        config: ConfigFactory, start_sidecar: SidecarStarter, limits: dict[str, Any]) -> None:
    # An agent retrying against a failing upstream spends its allowance with each try; the
    # fields on every answer (docs/reference/limits.md) are how it sees that before a 429.
    sidecar = await start_sidecar(config.settings({
        "proxy": {"upstream": f"http://{LOOPBACK}:{closed_port()}"}, "roles": METERED, "limits": limits}))
    _, key = await sidecar.create_key(roles=["metered"])
    async with client_session() as http:
        seen = []
        for headers in ({"Mcp-Session-Id": "never-issued"}, {}):
            async with http.post(sidecar.proxy_url + "/mcp", data=PING, headers={**bearer(key), **headers}) as resp:
                body = await resp.json()
                seen.append((resp.status, body["error"], resp.headers.get("RateLimit")))
    assert seen == [(404, "session_not_found", '"key";r=2;t=20'), (502, "upstream_unreachable", '"key";r=1;t=40')]


# Redis's count has a resolution of about 0.02 µs (docs/reference/limits.md): limits faster than
# ten million a second are approximate there, and not asked for here.
@pytest.mark.parametrize("text", ["999999999/hour", "2000000/second", "7/second"])
async def test_a_large_rate_limit_reports_the_same_allowance_in_memory_and_in_redis(
        text: str, limits: dict[str, Any]) -> None:
    # Redis counts in microseconds. An interval rounded to whole ones turned 2000000/second into
    # an interval of 0 (allowed, but told "r=0": an agent pacing itself would stop) and made
    # 999999999/hour count 4 µs per request instead of 3.6 (one tenth fewer requests).
    quota = Quota(LimitsSettings(redis_url=limits.get("redis_url", "")), Metrics(CollectorRegistry()),
                  JsonLog(level="error"))
    subject = f"key_large_{uuid.uuid4().hex}"
    limit = parse_rate_limit(text)
    try:
        first, second = await quota.take(subject, limit), await quota.take(subject, limit)
    finally:
        await quota.close()
    assert first.allowed and second.allowed
    assert first.fields[1][1].startswith(f'"key";r={limit.count - 1};')
    # The allowance refills between the two (by a whole request in a few microseconds, for most).
    assert second.fields[1][1].split(";")[1] in (f"r={limit.count - 2}", f"r={limit.count - 1}")


@pytest.mark.parametrize("url", ["redis://:s3cret@cache:notaport/0", "redis://:s3cret@cache/0?socket_timeout=soon",
                                 "unix://:s3cret@/run/redis.sock?db=first"])
@pytest.mark.parametrize("source", ["config", "environment"])
def test_a_redis_url_the_client_cannot_read_is_a_settings_error_that_never_echoes_it(
        config: ConfigFactory, url: str, source: str) -> None:
    # Found at startup as a bare ValueError of the Redis client, naming no setting.
    document = {"limits": {"redis_url": url}} if source == "config" else {}
    environ = {"TOOLIO_SIDECAR_REDIS_URL": url} if source == "environment" else {}
    with pytest.raises(SettingsError) as caught:
        config.settings(document, environ=environ)
    assert caught.value.key == ("limits.redis_url" if source == "config" else "TOOLIO_SIDECAR_REDIS_URL")
    assert "s3cret" not in str(caught.value)


async def test_one_slow_redis_answer_is_not_an_outage_for_every_key_but_several_in_a_row_are() -> None:
    # The check's timeout also counts time this process spends on other requests, so a single
    # timeout may be our own load: it must not switch every limited key to the failure mode
    # for a second. Several in a row mean Redis is away, and it is then not asked again at once.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the commands, never answers
        writer.close()

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    registry = CollectorRegistry()
    quota = Quota(LimitsSettings(redis_url=f"redis://{LOOPBACK}:{port}/0", redis_timeout_seconds=0.05),
                  Metrics(registry), JsonLog(level="error"))
    limit = RateLimit(5, "minute")
    try:
        asked = []
        for _ in range(5):
            assert (await quota.take("key_slow", limit)).allowed  # open: counted here instead
            asked.append(registry.get_sample_value("toolio_sidecar_limits_check_seconds_count"))
        # Three checks timed out, one by one, each asking Redis; then it was left alone.
        assert asked == [1, 2, 3, 3, 3]
        assert registry.get_sample_value("toolio_sidecar_limits_backend_errors_total", {"outcome": "allowed"}) == 5
        # Counted in this process meanwhile: the key's limit still holds.
        assert not (await quota.take("key_slow", limit)).allowed
    finally:
        await quota.close()
        server.close()


def test_memory_mode_makes_room_by_forgetting_whole_allowances_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many keys (an attacker's, or a fleet's) must not grow memory without bound, nor make a key
    # that is mid-allowance forget it while keys with whole allowances are kept.
    monkeypatch.setattr(quota_module, "MAX_TRACKED_KEYS", 100)
    quota = Quota(LimitsSettings(), Metrics(CollectorRegistry()), JsonLog(level="error"))
    busy, idle = RateLimit(2, "hour"), RateLimit(999_999_999, "second")
    assert quota.take_here("busy", busy).allowed and quota.take_here("busy", busy).allowed
    for n in range(500):  # each is whole again a nanosecond later
        quota.take_here(f"idle-{n}", idle)
    assert len(quota._tats) <= 100
    assert not quota.take_here("busy", busy).allowed  # its spent allowance was kept
