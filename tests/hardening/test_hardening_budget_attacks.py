"""Attacks on the failure budgets and the verification queue (docs/reference/status-codes.md,
Failure budgets), each with real requests against a real sidecar: clients bind to distinct
loopback addresses (any 127/8 address is local on Linux), so each is its own client network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

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


async def status_of(client: aiohttp.ClientSession, sidecar: RunningSidecar, token: str) -> int:
    async with client.get(sidecar.proxy_url + "/mcp", headers={"Authorization": f"Bearer {token}"}) as response:
        await response.read()
        return response.status


def queue_depth(sidecar: RunningSidecar) -> float:
    return sample(sidecar.services.registry, "toolio_sidecar_verification_queue_depth")


async def until(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def test_one_address_filling_the_queue_with_wrong_secrets_does_not_turn_away_another_addresss_valid_keys(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # Measured before: 1100 wrong secrets at once from one address (only 10 of them reach argon2,
    # the rest wait for its budget) answered 503 to 39 of 40 new valid keys from another address.
    # Real argon2 and one slot, so the attacker's ten held verifications keep the queue full long
    # enough for the holder to arrive while it is.
    queue = 60
    settings = hardening_settings(tmp_path, upstream.url, cheap_argon2=False,
                                  auth={"max_concurrent_verifications": 1, "max_queued_verifications": queue})
    async with running_sidecar(settings) as sidecar:
        keys = [(await sidecar.create_key(f"agent-{n}"))[1] for n in range(5)]
        own, _ = await sidecar.create_key("attackers-own-key")
    async with running_sidecar(settings) as sidecar, session_from(ATTACKER) as attacker, \
            session_from(HOLDER) as holder:
        guesses = [asyncio.create_task(status_of(attacker, sidecar, checksum_valid_token(own.lookup_id)))
                   for _ in range(queue + 20)]
        await until(lambda: queue_depth(sidecar) >= queue)
        statuses = await asyncio.gather(*(status_of(holder, sidecar, key) for key in keys))
        assert statuses == [200] * 5
        refused = await asyncio.gather(*guesses)
        # The attacker's own attempts are what gives way: its ten verifications ran, the others
        # were refused by its spent budget or turned away from the queue.
        assert refused.count(401) == 10, refused
        assert set(refused) <= {401, 429, 503}
        await until(lambda: queue_depth(sidecar) == 0)


async def test_clients_going_away_while_their_keys_wait_leave_nothing_held_and_their_keys_verified(
        tmp_path: Path, upstream: RecordingUpstream) -> None:
    # A verification is its own task (one per token): a client hanging up mid-wait neither cancels
    # it for others nor leaks its place in the queue or its held budget units.
    settings = hardening_settings(tmp_path, upstream.url, cheap_argon2=False,
                                  auth={"max_concurrent_verifications": 1, "failures_per_minute_per_address": 5})
    async with running_sidecar(settings) as sidecar:
        keys = [(await sidecar.create_key(f"agent-{n}"))[1] for n in range(20)]
        target, _ = await sidecar.create_key("target")
    async with running_sidecar(settings) as sidecar:
        async with session_from(HOLDER) as holder:
            waiting = [asyncio.create_task(status_of(holder, sidecar, key)) for key in keys]
            # Every request has arrived and most of them still wait for the one argon2 slot.
            await until(lambda: sample(sidecar.services.registry, "toolio_sidecar_cache_misses_total") == 20
                        and queue_depth(sidecar) >= 10)
            for task in waiting:
                task.cancel()
        # All twenty are verified all the same, none is left waiting.
        await until(lambda: argon2_runs(sidecar) == 20)
        await until(lambda: queue_depth(sidecar) == 0)
        runs = argon2_runs(sidecar)
        async with session_from(HOLDER) as holder:
            assert await asyncio.gather(*(status_of(holder, sidecar, key) for key in keys)) == [200] * 20
            # Served from the cache, and the address's budget (5) is whole: no unit was left held.
            assert argon2_runs(sidecar) == runs
            guesses = await asyncio.gather(*(status_of(holder, sidecar, checksum_valid_token(target.lookup_id))
                                             for _ in range(8)))
            assert sorted(guesses) == [401] * 5 + [429] * 3
