"""Failure budgets that never refuse a valid key (docs/reference/status-codes.md, 429 and 503):
a lookup id's holder is not locked out by someone hammering it from another network, a burst
of valid keys after a restart waits for argon2 instead of being refused, and only a full
verification queue answers 503.

Real sidecars on real TCP; clients bind to distinct loopback addresses (127.0.0.1, 127.0.0.5)
to be distinct client networks, or name IPv6 clients through ``X-Forwarded-For`` behind a
trusted proxy (``sidecar.gate.peers``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.attack import ATTACKER, HOLDER, argon2_runs, checksum_valid_token, session_from
from tests.support.config import hardening_settings
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.metrics import sample
from tests.support.upstreams import RecordingUpstream, recording_upstream

pytestmark = pytest.mark.timeout(120)

@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream() as up:
        yield up


async def status_of(client: aiohttp.ClientSession, sidecar: RunningSidecar, token: str,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with client.get(sidecar.proxy_url + "/mcp",
                          headers={"Authorization": f"Bearer {token}", **(headers or {})}) as response:
        return response.status, dict(response.headers), await response.read()


async def hammer(client: aiohttp.ClientSession, sidecar: RunningSidecar, lookup_id: str, count: int) -> list[int]:
    return [(await status_of(client, sidecar, checksum_valid_token(lookup_id)))[0] for _ in range(count)]


async def test_holder_gets_through_while_another_address_spends_every_budget_of_its_lookup_id(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # The global cap (5) is below the per-network budget (10): the attacker spends both the cap
    # and, further on, its own network's budget for the lookup id.
    settings = hardening_settings(tmp_path, upstream.url, auth={"failures_per_minute_per_lookup_id_total": 5})
    async with session_from(ATTACKER) as attacker, session_from(HOLDER) as holder:
        async with running_sidecar(settings) as sidecar:
            record, key = await sidecar.create_key("holder")
            statuses = await hammer(attacker, sidecar, record.lookup_id, 15)
            assert statuses == [401] * 5 + [429] * 10
            # Never verified here (cold cache): the holder's network has no failure against the
            # lookup id, so the spent cap does not apply to it.
            assert (await status_of(holder, sidecar, key))[0] == 200
            assert len(upstream.completed) == 1
        # After a restart (same store, empty cache) the attacker starts again first.
        async with running_sidecar(settings) as sidecar:
            assert len(sidecar.services.cache) == 0
            statuses = await hammer(attacker, sidecar, record.lookup_id, 8)
            assert statuses == [401] * 5 + [429] * 3
            runs = argon2_runs(sidecar)
            status, _, _ = await status_of(holder, sidecar, key)
            assert status == 200
            assert argon2_runs(sidecar) == runs + 1  # verified afresh, not let through unchecked
            # The attacker is still refused, and its own network's budget (10) is its only way
            # past the cap: a network that has failed is held to it.
            assert (await hammer(attacker, sidecar, record.lookup_id, 1)) == [429]
            assert len(upstream.completed) == 2


async def test_holder_gets_through_with_default_budgets_after_another_address_spent_its_own(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url)  # 10 per (lookup id, network), 100 in all
    async with session_from(ATTACKER) as attacker, session_from(HOLDER) as holder, \
            running_sidecar(settings) as sidecar:
        record, key = await sidecar.create_key("holder")
        statuses = await hammer(attacker, sidecar, record.lookup_id, 14)
        assert statuses == [401] * 10 + [429] * 4
        assert (await status_of(holder, sidecar, key))[0] == 200


async def test_a_holder_that_failed_recently_is_held_to_the_spent_cap(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # The exemption is for networks with no failure against the lookup id in the last minute; one
    # that has failed is one more guesser (docs/reference/status-codes.md).
    settings = hardening_settings(tmp_path, upstream.url, auth={"failures_per_minute_per_lookup_id_total": 3})
    async with session_from(ATTACKER) as attacker, session_from(HOLDER) as holder, \
            running_sidecar(settings) as sidecar:
        record, key = await sidecar.create_key("holder")
        assert await hammer(holder, sidecar, record.lookup_id, 1) == [401]  # a typo
        assert await hammer(attacker, sidecar, record.lookup_id, 3) == [401, 401, 429]
        status, headers, body = await status_of(holder, sidecar, key)
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"] == "rate_limited"


async def test_ipv6_clients_share_an_address_budget_per_slash_64(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    settings = hardening_settings(tmp_path, upstream.url, proxy={"trusted_proxies": ["127.0.0.0/8"]},
                                  auth={"failures_per_minute_per_address": 4})
    async with session_from(HOLDER) as client, running_sidecar(settings) as sidecar:
        statuses = [(await status_of(client, sidecar, checksum_valid_token(f"Unknown{n}"),
                                     {"X-Forwarded-For": f"2001:db8:1:1::{n + 1:x}"}))[0] for n in range(6)]
        # Six addresses of one /64 are one client.
        assert statuses == [401] * 4 + [429] * 2
        # The next /64 is another client.
        assert (await status_of(client, sidecar, checksum_valid_token("Unknown9"),
                                {"X-Forwarded-For": "2001:db8:1:2::1"}))[0] == 401
        # IPv4 clients are budgeted per address.
        assert (await status_of(client, sidecar, checksum_valid_token("Unknown8"),
                                {"X-Forwarded-For": "10.9.0.1"}))[0] == 401


async def test_199_distinct_valid_keys_at_once_from_one_address_after_a_restart_are_all_served(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # Default budgets (30 failures a minute per address) and two argon2 slots: the burst is six
    # times the address budget and a hundred times the slots.
    settings = hardening_settings(tmp_path, upstream.url)
    async with running_sidecar(settings) as sidecar:
        keys = [(await sidecar.create_key(f"agent-{n}"))[1] for n in range(199)]
    async with running_sidecar(settings) as sidecar, session_from(HOLDER) as client:
        results = await asyncio.gather(*(status_of(client, sidecar, key) for key in keys))
        statuses = [status for status, _, _ in results]
        assert statuses.count(200) == 199, {s: statuses.count(s) for s in set(statuses)}
        registry = sidecar.services.registry
        assert argon2_runs(sidecar) == 199
        assert sample(registry, "toolio_sidecar_verification_queue_wait_seconds_count") == 199
        assert sample(registry, "toolio_sidecar_verification_queue_depth") == 0
        assert sample(registry, "toolio_sidecar_auth_failures_total", reason="rate_limited") == 0


async def test_a_full_verification_queue_answers_503_with_retry_after_and_nothing_is_refused_for_good(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # Real argon2 (tens of milliseconds a run), one slot and room for one waiter: a burst of 12
    # new keys overflows the queue.
    settings = hardening_settings(tmp_path, upstream.url, cheap_argon2=False,
                                  auth={"max_concurrent_verifications": 1, "max_queued_verifications": 1})
    async with running_sidecar(settings) as sidecar, session_from(HOLDER) as client:
        keys = [(await sidecar.create_key(f"agent-{n}"))[1] for n in range(12)]
        results = await asyncio.gather(*(status_of(client, sidecar, key) for key in keys))
        statuses = [status for status, _, _ in results]
        assert set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 2
        for status, headers, body in results:
            if status == 503:
                assert headers["Retry-After"] == "1"
                assert headers["Content-Type"] == "application/json"
                answer: dict[str, Any] = json.loads(body)
                assert answer["error"] == "verification_queue_full"
                assert "retry" in answer["error_description"]
                assert all(key not in body.decode() for key in keys)
        refused = statuses.count(503)
        registry = sidecar.services.registry
        assert sample(registry, "toolio_sidecar_auth_failures_total", reason="queue_full") == refused
        # Nothing was spent: retried one at a time, every refused key is served.
        for (status, _, _), key in zip(results, keys, strict=True):
            if status == 503:
                assert (await status_of(client, sidecar, key))[0] == 200
        assert sample(registry, "toolio_sidecar_auth_failures_total", reason="rate_limited") == 0
        assert sample(registry, "toolio_sidecar_verification_queue_depth") == 0


async def test_concurrent_wrong_secrets_reach_argon2_no_more_often_than_the_budget_allows(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # 30 distinct wrong secrets at once, from one address, against one lookup id whose budget for
    # that network is 5: each attempt holds a unit while it is verified, so no more than 5 run.
    settings = hardening_settings(tmp_path, upstream.url, auth={"failures_per_minute_per_lookup_id": 5})
    async with session_from(ATTACKER) as attacker, running_sidecar(settings) as sidecar:
        record, _ = await sidecar.create_key("target")
        results = await asyncio.gather(*(status_of(attacker, sidecar, checksum_valid_token(record.lookup_id))
                                         for _ in range(30)))
        statuses = [status for status, _, _ in results]
        assert statuses.count(401) == 5, statuses
        assert statuses.count(429) == 25
        assert argon2_runs(sidecar) == 5
