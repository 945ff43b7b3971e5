"""Authorization header -> :class:`Principal`, or the RFC 6750 error.

Order matters for cost and for fairness under attack:

1. parse the header (RFC 6750 2.1) and the key's shape and checksum: offline, no store;
2. the verified-key cache: a hit is a dict lookup plus a constant-time digest compare, and it
   is checked *before* any rate limit, so a key already verified keeps working while someone
   hammers its lookup id;
3. failure budgets per client network, per (lookup id, network) and per lookup id
   (sidecar.gate.buckets; 429 + Retry-After): spent by recorded failures only;
4. the negative cache (the same bad token never costs argon2 twice);
5. the store, then a bounded queue (503 + Retry-After only when it is full) in front of a few
   argon2id slots, off the event loop, so a flood of misses cannot stall the loop or the machine
   and a burst of valid keys waits its turn instead of being refused.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote

from sidecar.errors import (
    AuthError,
    InvalidToken,
    MalformedCredentials,
    MissingCredentials,
    RateLimited,
    StoreUnavailable,
    VerificationsBusy,
)
from sidecar.gate.buckets import FailureBudgets, client_network
from sidecar.gate.cache import KeyCache
from sidecar.gate.oauth import OAuthGate
from sidecar.gate.peers import ClientRequest
from sidecar.gate.principal import Principal
from sidecar.keys.audit import AuditLog
from sidecar.keys.format import KEY_LEN, KeyFormatError, KeyHasher, ParsedKey, key_digest, lookup_id_of, parse_key
from sidecar.keys.records import DISABLED, KeyRecord
from sidecar.keys.store.base import KeyStore
from sidecar.metrics import Metrics
from sidecar.settings import Settings


def _lower_priority() -> None:
    """Run this (argon2) thread at nice +10. argon2 is the one CPU-bound thing the sidecar does
    and an attacker decides when it runs; at equal priority its threads take whole cores from the
    event loop and every cache hit and stream waits (measured: valid p99 x4 on 2 cores during a
    40-guess attack). On Linux a thread id is a valid PRIO_PROCESS target and only that thread
    changes; elsewhere this is a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class LastUsed:
    """Collects last-use times in memory; the store gets them in one batch per interval."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}

    def touch(self, key_id: str) -> None:
        self.pending[key_id] = time.time()

    def take(self) -> dict[str, datetime]:
        batch, self.pending = self.pending, {}
        return {k: datetime.fromtimestamp(t, UTC) for k, t in batch.items()}


# Something shaped like a key (tak_ + 46 base62), so "?q=tak_docs" is not mistaken for one.
# 40 body characters already hold the lookup id and most of the secret (the checksum and the last
# characters can be guessed offline), so a truncated key counts too; any case, since a component
# on the way may fold it.
_KEY_IN_QUERY = re.compile(r"tak_[0-9A-Za-z]{40,}", re.IGNORECASE)


# More rounds of percent-decoding than any client applies by accident; a target decoded this many
# times without settling is refused as if it held a key.
_MAX_DECODINGS = 8


def credential_in_query(query: str) -> bool:
    """Does the query carry a key or an ``access_token``, at any depth of percent-encoding
    (``tak_...``, ``tak%5F...``, ``tak%255F...``)? A key decoded once by one component and again
    by another is the same key, so every depth is treated alike (and never forwarded)."""
    for _ in range(_MAX_DECODINGS):
        folded = query.replace("+", " ")
        lowered = folded.lower()
        if "access_token" in lowered or ("tak_" in lowered and _KEY_IN_QUERY.search(folded)):
            return True
        if "%" not in query:
            return False
        decoded = unquote(query)
        if decoded == query:
            return False
        query = decoded
    return True


_REFUSED_WITHOUT_GUESSING = frozenset({"disabled", "expired", "workspace"})


class _WrongSecret(InvalidToken):
    """argon2 said no; the failure is already spent on the budgets of the verification's own
    client (in the same step as its held units were released), so its caller must not spend it
    again."""


def bearer_token(request: ClientRequest) -> str:
    """The token of the single ``Authorization: Bearer`` header, or the RFC 6750 error."""
    # RFC 6750 2.3 allows access_token in the query; we refuse it (it lands in logs and
    # histories) and say so, rather than silently ignoring it.
    query = request.query_string
    if query and credential_in_query(query):
        raise MalformedCredentials("API keys are accepted only in the Authorization header, "
                                   "never in the query string")
    values = request.headers.getall("Authorization", ())
    if not values:
        raise MissingCredentials()
    if len(values) > 1:
        raise MalformedCredentials("Send exactly one Authorization header")
    scheme, _, token = values[0].partition(" ")
    # RFC 9110 11.1: the auth-scheme is case-insensitive. RFC 6750 2.1: b64token, no spaces.
    if scheme.lower() != "bearer" or not token or " " in token.strip() or token != token.strip():
        raise MalformedCredentials("Expected 'Authorization: Bearer <API key>'")
    return token


class CacheTrust(Protocol):
    """Whether a verified key in the cache may be believed without asking the store (False
    while a shared store's change feed is stale: see sidecar.runtime.key_events)."""

    trusted: bool


class _AlwaysTrusted:
    trusted = True


class Authenticator:
    def __init__(self, settings: Settings, store: KeyStore, cache: KeyCache, hasher: KeyHasher,
                 metrics: Metrics, audit: AuditLog, last_used: LastUsed,
                 client_address: Callable[[ClientRequest], str], trust: CacheTrust | None = None,
                 oauth: OAuthGate | None = None) -> None:
        self._settings = settings
        self._store = store
        self._cache = cache
        self._hasher = hasher
        self._metrics = metrics
        self._audit = audit
        self._last_used = last_used
        self._client_address = client_address
        self._trust: CacheTrust = trust or _AlwaysTrusted()
        # Bearer tokens that are not keys (docs/reference/config.md, [oauth]); None when mode is off.
        self._oauth = oauth if oauth is not None and oauth.mode != "off" else None
        # RFC 9728 5.1: named in the public listener's 401 challenges in validate mode.
        self.resource_metadata = oauth.resource_metadata_url if oauth is not None else None
        self._budgets = FailureBudgets(settings.auth.failures_per_minute_per_address,
                                       settings.auth.failures_per_minute_per_lookup_id,
                                       settings.auth.failures_per_minute_per_lookup_id_total)
        self._verify_slots = asyncio.Semaphore(settings.auth.max_concurrent_verifications)
        # Verifications waiting for budget room or a slot (the queue in front of argon2), in all
        # and per client network, and those waiting for room, per network, each on its own
        # future: every release wakes them all, and one can be turned away alone (_admit).
        self._queued = 0
        self._queued_by_network: dict[str, int] = {}
        self._room_waiters: dict[str, dict[asyncio.Future[None], None]] = {}
        metrics.verification_queue.set_function(lambda: self._queued)
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight: dict[bytes, asyncio.Task[Principal]] = {}
        # Dedicated, lower-priority threads for argon2 (see _lower_priority), one per slot.
        # The workspace a key must belong to when the caller names none: the configured one, or,
        # with [workspaces], any (the admin listener, scoped afterwards by the key's own workspace).
        self._home: str | None = None if settings.multi_workspace else settings.workspace
        self._argon2_threads = ThreadPoolExecutor(settings.auth.max_concurrent_verifications,
                                                  thread_name_prefix="argon2", initializer=_lower_priority)

    async def authenticate(self, request: ClientRequest, *, users: bool = False,
                           workspace: str | None = None) -> Principal:
        """The caller of ``request``: a key; with ``users`` (the public listener) also a user or a
        pass-through token, as ``oauth.mode`` says. The admin listener takes keys only.
        ``workspace``: the request's (from its host); a key of any other is an unknown key."""
        try:
            token = bearer_token(request)
        except AuthError as exc:
            if isinstance(exc, MissingCredentials):
                self._metrics.count_auth_failure(exc.reason)
            else:
                self._fail(None, request, exc.reason, workspace)
            raise
        # Anything that starts like a key is one, even a mangled one: it is never passed on.
        if users and self._oauth is not None and token[:4].lower() != "tak_":
            return await self._authenticate_user(token, request)
        return await self.authenticate_token(token, request, workspace)

    async def _authenticate_user(self, token: str, request: ClientRequest) -> Principal:
        """A Bearer token that is not a key (sidecar.gate.oauth). A token already verified is
        believed before any budget, as a cached key is; a new one spends the client address's
        failure budget when it fails. Nothing keyed by a key (lookup-id budgets, last-used
        times, the negative cache) applies to it."""
        assert self._oauth is not None
        principal = self._oauth.cached(token)
        if principal is not None:
            return principal
        self._check_budget(client_network(self._client_address(request)), None)
        try:
            return await self._oauth.verify(token)
        except InvalidToken as exc:
            self._fail(None, request, exc.reason)
            raise

    async def authenticate_token(self, token: str, request: ClientRequest,
                                 workspace: str | None = None) -> Principal:
        """Authenticate a key presented some other way than the header (the admin page's login
        form), with the same cache, failure budgets and accounting as :meth:`authenticate`."""
        # Hot path: a token whose digest matches a verified key *is* that key, so its shape and
        # checksum were already checked when it was verified; parse only on a miss.
        digest = key_digest(token)
        expected = workspace if workspace is not None else self._home
        if len(token) == KEY_LEN:
            principal = self._cache.get(lookup_id_of(token), digest)
            if principal is not None and expected is not None and principal.workspace != expected:
                # Another workspace's key: taken as a miss, so it costs what an unknown key costs
                # and its answer is the same (no hint that it exists elsewhere).
                principal = None
            if principal is not None:
                if principal.deadline is not None and time.time() >= principal.deadline:
                    self._fail(principal.lookup_id, request, "expired", principal.workspace)
                    raise InvalidToken("expired")
                if not self._trust.trusted:
                    await self._recheck(principal, request)
                self._metrics.count_cache_hit()
                self._last_used.touch(principal.key_id)
                return principal
        try:
            parsed = parse_key(token)
        except KeyFormatError:
            self._check_budget(client_network(self._client_address(request)), None)
            self._fail(None, request, "invalid", expected)
            raise InvalidToken() from None
        self._metrics.cache_misses.inc()
        return await self._verify(parsed, digest, request, expected)

    async def _recheck(self, principal: Principal, request: ClientRequest) -> None:
        """The cache may be missing a change (the feed is stale): read the key's status from the
        store. The secret was proven when the key was cached; only its state can have moved."""
        record = await self._read(principal.lookup_id)
        reason = self._unusable(record, principal.workspace)
        if reason is None and record is not None and record.revision != principal.revision:
            # Changed since it was cached (roles, a scheduled disable): verify afresh next time.
            self._cache.invalidate(principal.key_id)
        if reason is not None:
            self._cache.invalidate(principal.key_id)
            self._fail(principal.lookup_id, request, reason, principal.workspace)
            raise InvalidToken(reason)

    async def _read(self, lookup_id: str) -> KeyRecord | None:
        try:
            return await self._store.get_by_lookup_id(lookup_id)
        except Exception:
            # Never a guess: with the store unreadable, a key's state is unknown (503, retry).
            self._metrics.store_unavailable.inc()
            raise StoreUnavailable() from None

    def forgive(self, lookup_id: str) -> None:
        """Forget failures against ``lookup_id`` (its key was just enabled again)."""
        self._budgets.forget(lookup_id)

    def _check_budget(self, network: str, lookup_id: str | None) -> None:
        wait = self._budgets.refusal(network, lookup_id)
        if wait is not None:
            self._metrics.count_auth_failure("rate_limited")
            raise RateLimited(wait)

    def _fail(self, lookup_id: str | None, request: ClientRequest, reason: str,
              workspace: str | None = None, *, spent: bool = False) -> None:
        client = self._client_address(request)
        if not spent:
            # The lookup-id budgets bound guessing at a key's secret. A disabled, expired or
            # foreign key is refused without argon2 and teaches nothing, so it does not spend
            # them: otherwise a revoked client's retries would lock the key out after it is
            # enabled again.
            guessed = lookup_id if reason not in _REFUSED_WITHOUT_GUESSING else None
            self._budgets.record_failure(client_network(client), guessed)
        self._metrics.count_auth_failure(reason)
        self._audit.auth_failed(lookup_id, client, reason, workspace)

    async def _verify(self, parsed: ParsedKey, digest: bytes, request: ClientRequest,
                      workspace: str | None) -> Principal:
        network = client_network(self._client_address(request))
        self._check_budget(network, parsed.lookup_id)
        # What a token's failure means depends on the workspace asked for (a key is "invalid" for
        # every workspace but its own), so negative results and flights are per workspace.
        scoped = digest if workspace is None else digest + b"@" + workspace.encode()
        known = self._cache.known_bad(scoped)
        if known is not None:
            self._fail(parsed.lookup_id, request, known, workspace)
            raise InvalidToken(known)
        # Single flight: one verification per token at a time. A burst of first requests from one
        # agent (or an attacker repeating one guess) shares a single store read and argon2 run, and
        # the verification is its own task, so a client going away cannot cut it short for others.
        flight = self._in_flight.get(scoped)
        started = flight is None
        if flight is None:
            flight = asyncio.get_running_loop().create_task(
                self._verify_once(parsed, digest, network, workspace, scoped))
            self._in_flight[scoped] = flight
            flight.add_done_callback(lambda done: self._landed(scoped, done))
        try:
            return await asyncio.shield(flight)
        except InvalidToken as exc:
            # Others sharing the flight (the same token, perhaps from elsewhere) spend their own.
            self._fail(parsed.lookup_id, request, exc.reason, workspace,
                       spent=started and isinstance(exc, _WrongSecret))
            raise InvalidToken(exc.reason) from None

    def _landed(self, digest: bytes, flight: asyncio.Task[Principal]) -> None:
        if self._in_flight.get(digest) is flight:
            del self._in_flight[digest]
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter may have gone away

    async def _verify_once(self, parsed: ParsedKey, digest: bytes, network: str, workspace: str | None,
                           scoped: bytes) -> Principal:
        epoch = self._cache.epoch
        record = await self._read(parsed.lookup_id)
        reason = self._unusable(record, workspace)
        if reason is not None:
            # Disabled / expired / unknown keys are refused before argon2: nothing to learn from
            # the secret, and it keeps a revoked client's retries cheap. Another workspace's key
            # takes exactly the unknown key's path: one store read, no argon2, the same answer.
            self._cache.remember_bad(scoped, epoch, reason)
            raise InvalidToken(reason)
        assert record is not None
        ok = await self._queued_verify(network, parsed.lookup_id, record.key_hash, parsed.full)
        if not ok:
            self._cache.remember_bad(scoped, epoch)
            raise _WrongSecret()
        if epoch != self._cache.epoch:
            # Something was invalidated while we verified: read the key again rather than trust
            # a record that may predate a disable (the refill race).
            record = await self._read(parsed.lookup_id)
            reason = self._unusable(record, workspace)
            if reason is not None:
                raise InvalidToken(reason)
            assert record is not None
        if self._hasher.needs_rehash(record.key_hash):
            self._spawn(self._rehash(record.id, parsed.full))
        principal = Principal.from_record(record, self._settings)
        self._cache.put(digest, principal, epoch)
        self._metrics.cache_size.set(len(self._cache))
        self._last_used.touch(principal.key_id)
        return principal

    async def _queued_verify(self, network: str, lookup_id: str, key_hash: str, full_key: str) -> bool:
        """argon2 for one attempt, after its turn in the queue: first room in its failure budgets
        (units held by attempts still being verified are waited for, never refused: a success
        gives its unit back), then a free slot. Only a full queue refuses (503), and only
        recorded failures answer 429."""
        self._admit(network)
        queued = True
        entered = time.perf_counter()
        try:
            while True:
                # Checked again: others may have spent the budgets while we read the store or waited.
                self._check_budget(network, lookup_id)
                if self._budgets.try_hold(network, lookup_id):
                    break
                wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                waiters = self._room_waiters.setdefault(network, {})
                waiters[wake] = None
                try:
                    await wake
                finally:
                    waiters.pop(wake, None)
                    if not waiters and self._room_waiters.get(network) is waiters:
                        del self._room_waiters[network]
                    if wake.done() and not wake.cancelled() and wake.exception() is not None:
                        queued = False  # turned away: _admit gave its place to another network
            failed = False
            try:
                async with self._verify_slots:
                    self._leave(network)
                    queued = False
                    started = time.perf_counter()
                    self._metrics.verification_wait_seconds.observe(started - entered)
                    ok: bool = await asyncio.get_running_loop().run_in_executor(
                        self._argon2_threads, self._hasher.verify, key_hash, full_key)
                    self._metrics.argon2_seconds.observe(time.perf_counter() - started)
                failed = not ok
                return ok
            finally:
                # A wrong secret spends the held units in the same step (see _WrongSecret).
                self._budgets.release(network, lookup_id, failed=failed)
                for waiting in self._room_waiters.values():
                    for wake in waiting:
                        if not wake.done():
                            wake.set_result(None)
        finally:
            if queued:
                self._leave(network)

    def _admit(self, network: str) -> None:
        """A place in the queue for an attempt from ``network``, or 503. When the queue is full,
        the network with the most attempts in it gives way to one with fewer: its newest attempt
        still waiting for room in its own budgets is turned away (503) instead. Otherwise one
        client could fill the queue with wrong secrets that wait behind its own few held units
        (for nothing but a 429) and have every other client's new keys refused."""
        if self._queued >= self._settings.auth.max_queued_verifications:
            counts = self._queued_by_network
            crowded = max(self._room_waiters, key=counts.__getitem__, default=None)
            victim = None
            if crowded is not None and counts[crowded] > counts.get(network, 0) + 1:
                waiting = self._room_waiters[crowded]
                # Not one a release has already woken: it is checking its budgets again now.
                victim = next((wake for wake in reversed(waiting) if not wake.done()), None)
            self._metrics.count_auth_failure(VerificationsBusy.reason)
            if victim is None:
                raise VerificationsBusy()
            assert crowded is not None
            del self._room_waiters[crowded][victim]
            if not self._room_waiters[crowded]:
                del self._room_waiters[crowded]
            self._leave(crowded)
            victim.set_exception(VerificationsBusy())
        self._queued += 1
        self._queued_by_network[network] = self._queued_by_network.get(network, 0) + 1

    def _leave(self, network: str) -> None:
        self._queued -= 1
        left = self._queued_by_network.get(network, 0) - 1
        if left > 0:
            self._queued_by_network[network] = left
        else:
            self._queued_by_network.pop(network, None)

    def _unusable(self, record: KeyRecord | None, workspace: str | None) -> str | None:
        if record is None:
            return "invalid"
        if workspace is not None and record.workspace != workspace:
            # With [workspaces] a key of another workspace is, to this request, an unknown key in
            # every way: the same reason, budgets, audit row and answer (docs/reference/keys.md).
            return "invalid" if self._home is None else "workspace"
        if record.status == DISABLED:
            return "disabled"
        deadline = record.deadline()
        if deadline is not None and time.time() >= deadline:
            return "expired"
        return None

    async def _rehash(self, key_id: str, full_key: str) -> None:
        # argon2 parameters changed since this hash was made (docs/reference/keys.md): store a fresh hash.
        async with self._verify_slots:
            new_hash = await asyncio.get_running_loop().run_in_executor(
                self._argon2_threads, self._hasher.hash, full_key)
        await self._store.update_hash(key_id, new_hash)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        flights = list(self._in_flight.values())
        for task in [*self._background, *flights]:
            task.cancel()
        await asyncio.gather(*self._background, *flights, return_exceptions=True)
        self._argon2_threads.shutdown(wait=False, cancel_futures=True)
