"""Per-key rate limits (docs/reference/limits.md): GCRA, in this process or shared in Redis.

GCRA (the generic cell rate algorithm) keeps one number per key, its *theoretical arrival time*
(TAT): when the key's allowance would be whole again if nothing more came. A request moves the
TAT one emission interval (period / count) further; it is refused when that would put the TAT
more than one period ahead of now. So a key at rest may spend its whole count at once (the
burst), then one request per interval; the memory per key is one float, the work per request a
handful of arithmetic operations.

The answer carries the fields of draft-ietf-httpapi-ratelimit-headers-10 (section 3 and 4):
``RateLimit-Policy: "key";q=COUNT;w=PERIOD`` and ``RateLimit: "key";r=REMAINING;t=SECONDS``,
where ``t`` is when the allowance is whole again.

With ``limits.redis_url`` every replica asks Redis, one atomic script run per request (the checks
of one turn of the event loop share a pipeline, one round trip): the TAT lives in Redis and its
clock is Redis's own ``TIME``, so replicas with skewed clocks still share one limit. When Redis
cannot answer within ``limits.redis_timeout_seconds``, ``limits.redis_failure`` decides:
``open`` counts the request in this process instead, ``closed`` refuses it with 503; both are
counted (``toolio_sidecar_limits_backend_errors``).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

from sidecar.errors import Fields, SidecarError
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.settings import LimitsSettings, RateLimit

# The policy's name in the RateLimit fields: the one quota this sidecar applies, per key.
POLICY_NAME = '"key"'
# Keys whose TAT is remembered in memory mode; an evicted key starts again with a whole
# allowance, so the bound only ever errs towards letting requests through.
MAX_TRACKED_KEYS = 100_000
REDIS_PREFIX = "toolio-sidecar:rate:"
# Where the shared count's times start (2023-11-14, Unix seconds); see _GCRA_SCRIPT.
REDIS_EPOCH = 1_700_000_000
LOG_EVERY_SECONDS = 10.0
# After a failed Redis check, the next this many seconds decide without asking Redis.
RETRY_REDIS_SECONDS = 1.0
# Timed-out checks in a row that count as Redis being away (see _take_shared).
TIMEOUTS_FOR_OUTAGE = 3
# Connections to Redis per process: checks beyond this many at once wait for one.
REDIS_CONNECTIONS = 64

# KEYS[1]: the key's TAT, in microseconds since REDIS_EPOCH. ARGV: emission interval (a float:
# a limit of millions per second has one under a microsecond), period (µs) and the limit's count.
# Returns {allowed (0|1), remaining, microseconds until whole, retry-after µs}.
# Redis's TIME is the one clock; the TAT expires when it would be in the past anyway. A TAT more
# than a period ahead was written before that clock stepped back: it counts as a spent allowance,
# not as a lockout for as long as the step. Times count from REDIS_EPOCH, not 1970, so that the
# float TAT keeps a resolution of about a hundredth of a microsecond (Lua numbers are doubles).
_GCRA_SCRIPT = """
local now_parts = redis.call('TIME')
local now = (tonumber(now_parts[1]) - tonumber(ARGV[4])) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
if tat > now + period then tat = now + period end
local new_tat = tat + interval
if new_tat - now > period then
  return {0, 0, tat - now, new_tat - now - period}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.floor((period - (new_tat - now)) * tonumber(ARGV[3]) / period + 1e-6), new_tat - now, 0}
"""


# One check waiting to be sent to Redis: the key, the script's arguments, and its answer.
_Check = tuple[str, tuple[object, ...], asyncio.Future[list[int]]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rate-limit decision and the fields that describe it to the client."""

    allowed: bool
    fields: Fields
    retry_after: int = 0


class RateLimitExceeded(SidecarError):
    """429: the key has spent its rate limit (docs/reference/limits.md)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, verdict: Verdict, limit: RateLimit) -> None:
        super().__init__(f"This key's rate limit ({limit}) is spent; retry after {verdict.retry_after} s")
        self.verdict = verdict

    def headers(self) -> Fields:
        return [("Retry-After", str(self.verdict.retry_after)), *self.verdict.fields]


class TooManyInFlight(SidecarError):
    """429: the key already has ``proxy.max_concurrent_requests_per_key`` requests in flight."""

    status = 429
    code = "too_many_requests_in_flight"

    def __init__(self, bound: int) -> None:
        super().__init__(f"This key already has {bound} requests in flight (open streams included); "
                         "retry when one ends")

    def headers(self) -> Fields:
        return [("Retry-After", "1")]


class LimitsUnavailable(SidecarError):
    """503: the shared rate-limit counter (Redis) cannot answer and ``limits.redis_failure`` is
    ``closed``."""

    status = 503
    code = "limits_unavailable"

    def __init__(self) -> None:
        super().__init__("Rate limits cannot be checked right now; retry shortly")

    def headers(self) -> Fields:
        return [("Retry-After", "1")]


def _fields(limit: RateLimit, remaining: int, whole_in: float) -> Fields:
    # Integer seconds (draft-ietf-httpapi-ratelimit-headers-10, 4.1: "t" is a non-negative
    # Integer): rounded up, so a client that waits t seconds finds its allowance whole.
    return [("RateLimit-Policy", _policy(limit)),
            ("RateLimit", f"{POLICY_NAME};r={max(0, remaining)};t={max(0, math.ceil(whole_in))}")]


@functools.lru_cache(maxsize=1024)
def _policy(limit: RateLimit) -> str:
    return f"{POLICY_NAME};q={limit.count};w={int(limit.period)}"


class Quota:
    """Rate-limit decisions for keys: :meth:`take` one request from a key's allowance."""

    def __init__(self, settings: LimitsSettings, metrics: Metrics, log: JsonLog) -> None:
        self._settings = settings
        self._metrics = metrics
        self._log = log
        self._tats: dict[str, float] = {}  # key id -> TAT (time.monotonic seconds)
        self._redis: Any = None
        self._sha = ""
        self._quiet_until = 0.0
        self._down_until = 0.0
        self._timeouts_in_row = 0
        self._timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)
        if settings.shared:
            import redis.asyncio  # only when configured: memory mode needs no Redis client

            # A pool that makes a check wait for a free connection (within the check's own
            # timeout): the default pool raises at once past its size, and a burst of requests
            # would then count as an outage, for every limited key (redis_failure decides).
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=REDIS_CONNECTIONS, timeout=settings.redis_timeout_seconds,
                socket_timeout=settings.redis_timeout_seconds,
                socket_connect_timeout=settings.redis_timeout_seconds, health_check_interval=30)
            self._redis = redis.asyncio.Redis.from_pool(pool)
            self._sha = self._redis.register_script(_GCRA_SCRIPT).sha
            self._timeout_errors = (TimeoutError, redis.exceptions.TimeoutError)
            self._no_script: type[Exception] = redis.exceptions.NoScriptError
        # Checks waiting to be sent (key, script arguments, their answer): see _batched.
        self._waiting: list[_Check] = []
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def shared(self) -> bool:
        return self._redis is not None

    async def take(self, subject: str, limit: RateLimit) -> Verdict:
        """Spend one request of ``subject``'s (a key id's) ``limit``."""
        if self._redis is None:
            return self.take_here(subject, limit)
        return await self._take_shared(subject, limit)

    def take_here(self, subject: str, limit: RateLimit) -> Verdict:
        """The in-process decision (memory mode): no I/O, O(1)."""
        now = time.monotonic()
        tats = self._tats
        tat = tats.get(subject, now)
        if tat < now:
            tat = now
        new_tat = tat + limit.interval
        ahead = new_tat - now
        if ahead > limit.period:
            wait = max(1, math.ceil(ahead - limit.period))
            return Verdict(False, _fields(limit, 0, tat - now), wait)
        if subject not in tats and len(tats) >= MAX_TRACKED_KEYS:
            self._forget_whole(now)
        tats[subject] = new_tat
        # Counted from the count, not by dividing by a tiny interval, and with a margin above
        # rounding error: 2000000/second reads r=1999999 after one request, not 1999998.
        return Verdict(True, _fields(limit, int((limit.period - ahead) * limit.count / limit.period + 1e-6), ahead))

    def _forget_whole(self, now: float) -> None:
        """Make room: a key whose allowance is whole again (its TAT is past) needs no entry; if
        that frees too little, the oldest half goes, and those keys start again with a whole
        allowance. Either way the bound only ever errs towards letting requests through."""
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        if len(self._tats) >= MAX_TRACKED_KEYS // 2:
            keep = list(self._tats.items())[len(self._tats) // 2:]
            self._tats = dict(keep)

    async def _take_shared(self, subject: str, limit: RateLimit) -> Verdict:
        if time.monotonic() < self._down_until:
            # Redis failed a moment ago: decide without waiting on it again for every request
            # (a blackholed Redis would otherwise add redis_timeout_seconds to each one).
            return self._backend_failed(subject, limit, None)
        started = time.perf_counter()
        period_us = int(limit.period * 1_000_000)
        try:
            allowed, remaining, whole_us, retry_us = await self._batched(
                REDIS_PREFIX + subject, (repr(period_us / limit.count), period_us, limit.count, REDIS_EPOCH))
        except Exception as exc:  # unreachable, timed out, refused: the setting decides
            return self._backend_failed(subject, limit, exc)
        finally:
            self._metrics.limits_check_seconds.observe(time.perf_counter() - started)
        if not allowed:
            wait = max(1, math.ceil(int(retry_us) / 1_000_000))
            return Verdict(False, _fields(limit, 0, int(whole_us) / 1_000_000), wait)
        return Verdict(True, _fields(limit, int(remaining), int(whole_us) / 1_000_000))

    def _batched(self, key: str, args: tuple[object, ...]) -> asyncio.Future[list[int]]:
        """One script run for ``key``, sent together with every other check that arrives in the
        same turn of the event loop: one pipeline, one write and one read for all of them. Under
        load that is most of the Redis client's per-command cost saved (bench/README.md, Limits)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[int]] = loop.create_future()
        self._waiting.append((key, args, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._send_waiting)
        return answer

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[_Check]) -> None:
        try:
            async with asyncio.timeout(self._settings.redis_timeout_seconds):
                results = await self._evalsha_all(batch)
        except BaseException as exc:
            # A refused or broken connection means Redis is away: stop asking for a moment. A
            # single timeout may be this process's own load (the timeout counts time the event
            # loop spent on other requests), so only several in a row count as an outage.
            timed_out = isinstance(exc, self._timeout_errors)
            self._timeouts_in_row = self._timeouts_in_row + 1 if timed_out else 0
            if not timed_out or self._timeouts_in_row >= TIMEOUTS_FOR_OUTAGE:
                self._down_until = time.monotonic() + RETRY_REDIS_SECONDS
            failure = exc if isinstance(exc, Exception) else ConnectionError("rate-limit check abandoned")
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        self._timeouts_in_row = 0
        for (_, _, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue  # its request gave up waiting (redis_timeout_seconds)
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)

    async def _evalsha_all(self, batch: list[_Check]) -> list[Any]:
        results = await self._pipeline(batch)
        if any(isinstance(r, self._no_script) for r in results):
            # Redis restarted or flushed its scripts: load it, then run the batch again (a
            # NOSCRIPT run changed nothing).
            await self._redis.script_load(_GCRA_SCRIPT)
            results = await self._pipeline(batch)
        return results

    async def _pipeline(self, batch: list[_Check]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for key, args, _ in batch:
            pipe.evalsha(self._sha, 1, key, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _backend_failed(self, subject: str, limit: RateLimit, exc: BaseException | None) -> Verdict:
        """Redis could not answer. ``closed``: 503. ``open``: the request is not refused for
        it, but it is still counted, in this process, as in memory mode: each replica then
        allows the whole limit (docs/reference/limits.md, When Redis is away)."""
        closed = self._settings.redis_failure == "closed"
        self._metrics.limits_backend_errors.labels("refused" if closed else "allowed").inc()
        now = time.monotonic()
        if exc is not None and now >= self._quiet_until:
            # Once per LOG_EVERY_SECONDS, not per request: an outage must not flood the log.
            self._quiet_until = now + LOG_EVERY_SECONDS
            self._log.warning("rate limits cannot be checked in Redis",
                              redis_failure=self._settings.redis_failure, error=type(exc).__name__)
        if closed:
            raise LimitsUnavailable()
        return self.take_here(subject, limit)

    async def close(self) -> None:
        for task in self._batches:
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
