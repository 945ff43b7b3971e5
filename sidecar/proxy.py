"""The proxy: header filtering, forwarding, streaming both ways, upstream error mapping.

The request's path through here: ``ProxyHandler.__call__`` -> guards (target form, Upgrade,
Origin, declared size) -> ``Authenticator.authenticate`` -> session binding ->
``upstream_header_lines`` (strip credentials and spoofable identity, add ours and the signed
assertion) -> ``request_head`` -> one request on a pooled upstream connection
(``sidecar.upstream``), its body relayed in one piece when small and known, else streamed ->
response head (bounded by ``upstream_timeout_seconds``) -> response body relayed in one piece
when small and known, else streamed chunk by chunk with no total timeout.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cachetools import TTLCache

from sidecar.assertion import Signer
from sidecar.auth import Authenticator
from sidecar.errors import AuthError, InvalidToken, ProxyError, SidecarError
from sidecar.listener import BodyError, Request
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.peers import ClientRequest, Network, client_address, is_trusted
from sidecar.principal import Principal
from sidecar.settings import ProxySettings
from sidecar.store import KeyStore, utcnow
from sidecar.upstream import PoolExhausted, UpstreamError, UpstreamPool, UpstreamResponse

if TYPE_CHECKING:
    from aiohttp import web  # the error responses are built by sidecar.errors (shared with admin)

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward, plus the fields this
# proxy owns itself: Host (the upstream's own, SPEC 3), Expect (100-continue is answered here)
# and credentials (MCP authorization spec: servers MUST NOT pass tokens through).
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer",
    "proxy-authorization", "proxy-authenticate",
})
# Content-Length too: the proxy frames the upstream request itself (RFC 9112 6.3), from the body
# it actually relays.
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "authorization", "content-length"}
_FORWARDED = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                        "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
IDENTITY_HEADERS = ("X-Toolio-Key-Id", "X-Toolio-Key-Name", "X-Toolio-Workspace", "X-Toolio-Roles",
                    "X-Toolio-Permissions", "X-Toolio-Assertion")
SESSION_HEADER = "Mcp-Session-Id"
# Methods whose requests normally carry content (RFC 9110 9.3): without a body they are sent with
# Content-Length: 0, as a general-purpose client would.
_CONTENT_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Bodies with a declared length up to this size are relayed in one piece (see _forward/_relay).
SMALL_BODY = 64 * 1024
# uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): an IP-literal, or a name of unreserved
# characters and percent-escapes, with an optional numeric port.
_VALID_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::[0-9]{0,5})?")


def connection_tokens(values: Iterable[str]) -> set[str]:
    """Field names listed in Connection headers (RFC 9110 7.6.1), lower-cased."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


_KEEP, _DROP, _FORWARDING = 0, 1, 2
# Header name -> what to do with it. Names repeat across requests, so the string checks run
# once per distinct name; bounded, and simply rebuilt if a client sprays random names.
_name_actions: dict[str, int] = {}


def _action(name: str) -> int:
    action = _name_actions.get(name)
    if action is None:
        lower = name.lower()
        # Names with "_" are dropped outright: some servers (CGI, WSGI, many frameworks) read
        # "X_Toolio_Key_Id" as "X-Toolio-Key-Id", which would let a client spoof identity.
        if "_" in lower or lower in _REQUEST_DROP or lower.startswith("x-toolio-"):
            action = _DROP
        elif lower in _FORWARDED:
            action = _FORWARDING
        else:
            action = _KEEP
        if len(_name_actions) >= 4096:
            _name_actions.clear()
        _name_actions[name] = action
    return action


def upstream_header_lines(incoming: Iterable[tuple[str, str]], *, principal: Principal, assertion: str,
                          peer: str, peer_trusted: bool, proto: str, host: str) -> list[tuple[str, str]]:
    """What goes upstream: the client's headers minus credentials, hop-by-hop fields, anything
    that could pose as our identity headers, and untrusted forwarding info; plus exactly one
    of each identity and X-Forwarded-* header."""
    items = incoming if isinstance(incoming, list | tuple) else list(incoming)
    named_in_connection: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            named_in_connection |= connection_tokens((value,))
    kept: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    forwarded_proto: str | None = None
    forwarded_host: str | None = None
    for name, value in items:
        action = _action(name)
        if action == _DROP or (named_in_connection and name.lower() in named_in_connection):
            continue
        if action == _FORWARDING:
            if peer_trusted:
                lower = name.lower()
                if lower == "x-forwarded-for":
                    forwarded_for.extend(h.strip() for h in value.split(",") if h.strip())
                elif lower == "x-forwarded-proto" and forwarded_proto is None:
                    forwarded_proto = value.strip()
                elif lower == "x-forwarded-host" and forwarded_host is None:
                    forwarded_host = value.strip()
                elif lower == "forwarded":
                    kept.append((name, value))
            continue
        kept.append((name, value))
    # X-Forwarded-For lists hops left to right; the peer we saw is always the last one.
    forwarded_for.append(peer)
    # None of these names can be in ``kept`` (dropped above), so appending keeps exactly one.
    kept += (
        ("X-Forwarded-For", ", ".join(forwarded_for)),
        ("X-Forwarded-Proto", forwarded_proto or proto),
        ("X-Forwarded-Host", forwarded_host or host),
        ("X-Toolio-Key-Id", principal.key_id),
        ("X-Toolio-Key-Name", principal.name),
        ("X-Toolio-Workspace", principal.workspace),
        ("X-Toolio-Roles", principal.roles_header),
        ("X-Toolio-Permissions", principal.permissions_header),
        ("X-Toolio-Assertion", assertion),
    )
    return kept


def request_head(method: str, target: str, authority: str, fields: list[tuple[str, str]], framing: str) -> bytes:
    """The upstream request's head (RFC 9112 3, 5): request line, Host, ``fields``, the framing
    field, blank line. Field names and values came through the server's parser (llhttp rejects
    CR, LF and NUL in them) or are the sidecar's own, so nothing here can split the head.
    utf-8 with surrogateescape reverses the listener's decoding: the client's bytes pass unchanged."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    parts += [f"{name}: {value}\r\n" for name, value in fields]
    parts.append(framing)
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response fields minus hop-by-hop ones, which RFC 9110 7.6.1 scopes to one
    connection in responses too (including any the upstream names in its own Connection), and
    minus Content-Length, which the listener writes from the body it actually sends."""
    items = headers if isinstance(headers, list | tuple) else list(headers)
    named = connection_tokens(value for name, value in items if name.lower() == "connection")
    if named:
        return [(name, value) for name, value in items
                if (lower := name.lower()) not in _RESPONSE_DROP and lower not in named]
    return [(name, value) for name, value in items if name.lower() not in _RESPONSE_DROP]


def send_error(request: Request, exc: SidecarError, *, close: bool = False) -> None:
    """Answer ``request`` with ``exc``'s JSON error (see sidecar.errors)."""
    response = exc.response()
    body = response.body
    assert isinstance(body, bytes)
    request.respond(response.status, response.reason, response.headers.items(), body,
                    close=close or response.keep_alive is False)


class StreamRegistry:
    """In-flight proxied requests per key id, so that disabling a key can cut its open streams
    (SPEC 2: within 1 s) and shutdown can wait for them to drain."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[asyncio.Task[object]]] = {}
        self.cut_tasks: set[asyncio.Task[object]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._count = 0
        # key id -> when it was last cut (perf_counter): a request whose authentication began
        # before that moment must not start forwarding afterwards (see was_cut_since).
        self._cut_at: dict[str, float] = {}
        # key id -> the timer that cuts its requests when the key expires (one per key with
        # requests in flight): an expired key's open stream ends within 1 s of expires_at,
        # as a disabled key's does.
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key_id: str, task: asyncio.Task[object], deadline: float | None = None) -> None:
        """Track ``task`` as in flight for ``key_id``; ``deadline`` (epoch seconds) is when the
        key stops authenticating (expiry or scheduled disable): its requests are cut then."""
        tasks = self._by_key.get(key_id)
        if tasks is None:
            tasks = self._by_key[key_id] = set()
        tasks.add(task)
        self._count += 1
        self.idle.clear()
        if deadline is not None and key_id not in self._expiry_timers:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - time.time())
            self._expiry_timers[key_id] = loop.call_at(loop.time() + delay, self._expired, key_id)

    def _expired(self, key_id: str) -> None:
        self._expiry_timers.pop(key_id, None)
        self.cut(key_id)

    def discard(self, key_id: str, task: asyncio.Task[object]) -> None:
        tasks = self._by_key.get(key_id)
        if tasks is not None and task in tasks:
            tasks.discard(task)
            self._count -= 1
            if not tasks:
                del self._by_key[key_id]
                timer = self._expiry_timers.pop(key_id, None)
                if timer is not None:
                    timer.cancel()
            if self._count == 0:
                self.idle.set()
        self.cut_tasks.discard(task)

    def __len__(self) -> int:
        return self._count

    def cut(self, key_id: str) -> int:
        """Cancel every in-flight request of ``key_id``; returns how many."""
        now = time.perf_counter()
        if len(self._cut_at) > 10_000:
            self._cut_at = {k: t for k, t in self._cut_at.items() if now - t < 60}
        self._cut_at[key_id] = now
        tasks = list(self._by_key.get(key_id, ()))
        for task in tasks:
            self.cut_tasks.add(task)
            task.cancel()
        return len(tasks)

    def was_cut_since(self, key_id: str, moment: float) -> bool:
        """Was ``key_id`` cut at or after ``moment`` (a perf_counter reading)?"""
        at = self._cut_at.get(key_id)
        return at is not None and at >= moment

    def uncut(self, key_id: str) -> None:
        """The key is usable again (enabled): forget its last cut."""
        self._cut_at.pop(key_id, None)

    def cut_all(self) -> int:
        return sum(self.cut(key_id) for key_id in list(self._by_key))


class SessionBindings:
    """Mcp-Session-Id -> the key id that opened it (MCP security best practices: bind sessions
    to the caller). The store holds the bindings, so they survive restarts and hold on every
    replica sharing it; a binding is made once, when the upstream issues the id, and never moves
    to another key. Owners read once are remembered here: a binding never changes, so a cached
    owner cannot go stale, and an active session costs no store read per request."""

    def __init__(self, store: KeyStore, maxsize: int, ttl: float) -> None:
        self._store = store
        # Forgotten here no later than the store's pruning forgets them (see Services).
        self._owners: TTLCache[str, str] = TTLCache(maxsize, ttl, timer=time.monotonic)
        self._seen: dict[str, float] = {}

    async def owner(self, session_id: str) -> str | None:
        owner = self._owners.get(session_id)
        if owner is None:
            owner = await self._store.session_owner(session_id)
            if owner is not None:
                self._owners[session_id] = owner
        if owner is not None:
            self._seen[session_id] = time.time()
        return owner

    async def bind(self, session_id: str, key_id: str) -> str:
        """Bind (unless bound already) and return the owner."""
        owner = self._owners.get(session_id)
        if owner is None:
            owner = await self._store.bind_session(session_id, key_id, utcnow())
            self._owners[session_id] = owner
        return owner

    def take_seen(self) -> dict[str, datetime]:
        """Last-use times since the previous call, for one batched store write."""
        seen, self._seen = self._seen, {}
        return {k: datetime.fromtimestamp(t, UTC) for k, t in seen.items()}


class _BodyTooLarge(Exception):
    pass


class _ClosingError(ProxyError):
    """A refusal after which the connection's remaining bytes are not read: a body we cannot
    frame, or one we will not take (RFC 9110 15.5.14: on 413 the server MAY close the connection)."""

    def response(self) -> web.Response:
        response = super().response()
        response.force_close()
        return response


class _MalformedBody(_ClosingError):
    def __init__(self) -> None:
        super().__init__(400, "invalid_request", "Malformed request body")


def _body_too_large(limit: int) -> ProxyError:
    return _ClosingError(413, "body_too_large", f"Request body exceeds {limit} bytes")


@dataclass(slots=True)
class _Outcome:
    status: int = 0
    bytes_out: int = 0


class ProxyHandler:
    def __init__(self, settings: ProxySettings, authenticator: Authenticator, signer: Signer,
                 pool: UpstreamPool, metrics: Metrics, log: JsonLog,
                 streams: StreamRegistry, bindings: SessionBindings) -> None:
        self._settings = settings
        self._trusted: tuple[Network, ...] = settings.trusted_proxies
        self._auth = authenticator
        self._signer = signer
        self._pool = pool
        self._metrics = metrics
        self._log = log
        self._streams = streams
        self._bindings = bindings
        self._head_timeout = settings.upstream_timeout_seconds

    def client_address(self, request: ClientRequest) -> str:
        return client_address(request, self._trusted)

    async def __call__(self, request: Request) -> None:
        started = time.perf_counter()
        outcome = _Outcome()
        principal: Principal | None = None
        try:
            self._guard(request)
            principal = await self._auth.authenticate(request)
            await self._forward(request, principal, outcome, started)
        except (AuthError, ProxyError) as exc:
            outcome.status = exc.status
            if request.started:
                request.abort()  # too late for an error answer: end the connection instead
            else:
                # A request the guard refused to interpret (bad Host, an upgrade, an odd target):
                # read nothing more from this connection (RFC 9112 9.6, 11.2).
                send_error(request, exc, close=principal is None and isinstance(exc, ProxyError)
                           and exc.status == 400)
        finally:
            status = outcome.status or 499  # 499: the client went away before an answer
            self._metrics.count_request(status, request.method)
            headers = request.headers
            self._log.access(
                key_id=principal.key_id if principal else None,
                key_name=principal.name if principal else None,
                client=request.remote, method=request.method, path=request.path,
                mcp_method=headers.get("Mcp-Method"), mcp_name=headers.get("Mcp-Name"), status=status,
                duration_ms=(time.perf_counter() - started) * 1000, bytes_in=request.content_length,
                bytes_out=outcome.bytes_out)

    def _guard(self, request: Request) -> None:
        # An absolute-form or asterisk-form target (RFC 9112 3.2.2/3.2.4) must never steer the
        # upstream: only origin-form paths are forwarded.
        # RFC 9112 3.2.1: origin-form has no fragment; a client never sends one, and the upstream
        # must see exactly the target that was signed (htu).
        if not request.raw_path.startswith("/") or "#" in request.raw_path:
            raise ProxyError(400, "invalid_request", "Only origin-form request targets are accepted")
        # CONNECT asks for a tunnel (RFC 9110 9.3.6), which is not something an MCP server offers;
        # a 2xx to it would turn the upstream connection into one.
        if request.method == "CONNECT":
            raise ProxyError(400, "invalid_request", "CONNECT is not supported")
        # RFC 9112 3.2: a request whose Host is missing (HTTP/1.1), repeated (the listener refuses
        # that) or not a valid "uri-host [':' port]" MUST get a 400. Ours is stricter than reg-name's
        # sub-delims: the value is passed on in X-Forwarded-Host, where "," or ";" would read as a
        # list or a parameter to the upstream.
        host = request.headers.get("Host")
        if (host is not None or request.version >= (1, 1)) and not _VALID_HOST.fullmatch(host or ""):
            raise ProxyError(400, "invalid_request", "Invalid Host header")
        if "Upgrade" in request.headers:
            raise ProxyError(400, "invalid_request", "Protocol upgrades are not supported")
        origin = request.headers.get("Origin")
        # MCP transport spec (Streamable HTTP, security warning): validate Origin to stop DNS
        # rebinding from browsers; requests without Origin (non-browser agents) pass.
        if origin is not None and origin.lower() not in self._settings.allowed_origins:
            raise ProxyError(403, "origin_not_allowed", "This Origin is not allowed")
        length = request.content_length
        if length is not None and length > self._settings.max_body_bytes:
            raise _body_too_large(self._settings.max_body_bytes)

    async def _forward(self, request: Request, principal: Principal, outcome: _Outcome, started: float) -> None:
        # Registered before the first await of forwarding (reading the body), so a disable from
        # now on cuts this request; and one that landed while authentication was still running
        # (a shared argon2 verification, a slow store read) refuses it here (SPEC 2: the next
        # request after a disable is rejected).
        task: asyncio.Task[object] | None = asyncio.current_task()
        assert task is not None
        self._streams.add(principal.key_id, task, principal.deadline)
        try:
            await self._forward_registered(request, principal, outcome, started, task)
        finally:
            self._streams.discard(principal.key_id, task)

    async def _forward_registered(self, request: Request, principal: Principal, outcome: _Outcome,
                                  started: float, task: asyncio.Task[object]) -> None:
        if self._streams.was_cut_since(principal.key_id, started):
            self._metrics.count_auth_failure("disabled")
            raise InvalidToken("disabled")
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is not None:
            # Only sessions issued through this sidecar (and bound in the store before their id
            # reached the client) are forwarded. An id nobody was issued is never passed on, so no
            # spelling the upstream might read as another key's session can reach it; 404 is what
            # the MCP transport (Streamable HTTP, session management) answers for an unknown
            # session, and tells the client to start a new one.
            try:
                owner = await self._bindings.owner(session_id)
            except Exception:
                raise ProxyError(503, "store_unavailable", "Cannot check the MCP session; retry") from None
            if owner is None:
                raise ProxyError(404, "session_not_found", "Unknown MCP session; start a new one")
            if owner != principal.key_id:
                raise ProxyError(403, "session_forbidden", "This MCP session belongs to another key")
        pool = self._pool
        # htu is the target the upstream receives: the upstream's base path + the client's target.
        target = pool.base_path + request.raw_path
        fields = upstream_header_lines(
            request.headers.items(), principal=principal,
            assertion=self._signer.sign(principal, request.method, target),
            peer=request.remote or "unknown", peer_trusted=is_trusted(request.remote, self._trusted),
            proto=request.scheme, host=request.host,
        )
        too_large = False
        malformed = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal too_large, malformed
            total = 0
            limit = self._settings.max_body_bytes
            try:
                async for chunk in request.iter_body():
                    total += len(chunk)
                    if total > limit:
                        too_large = True
                        raise _BodyTooLarge()
                    yield chunk
            except BodyError:
                # The client's body broke its own framing (RFC 9112 7.1): the upstream request is
                # aborted mid-body, and the client is told 400, not that the upstream failed.
                malformed = True
                raise

        method = request.method
        length = request.content_length
        data: AsyncIterator[bytes] | bytes | None
        if not request.body_exists:
            data = None
            # RFC 9110 8.6: a method that usually has content says "none" with a zero length.
            framing = "Content-Length: 0\r\n" if method in _CONTENT_METHODS else ""
        elif length is not None and length <= SMALL_BODY:
            # A small body with a declared length is one complete JSON-RPC message already in
            # the socket buffer: relaying it in one piece (head and body in one write) saves the
            # per-chunk machinery (PERFORMANCE.md: body streaming is ~17% of a bare proxy's cost).
            # Anything chunked, larger, or without a length streams chunk by chunk.
            # Usually the whole body came with the head: take it without a wait.
            if request.body_complete:
                data = request.take_body()
            else:
                try:
                    # Bounded like a streamed body is (by the upstream head deadline): a client that
                    # stops sending mid-body must not hold the connection and handler for good.
                    async with asyncio.timeout(self._head_timeout):
                        data = await request.read_body()
                except BodyError:
                    raise _MalformedBody() from None
                except TimeoutError:
                    raise _ClosingError(408, "request_timeout", "The request body did not arrive in time") from None
            if len(data) != length:
                raise _MalformedBody()
            framing = f"Content-Length: {length}\r\n"
        else:
            data = body()
            framing = "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
        head = request_head(method, target, pool.authority, fields, framing)
        up: UpstreamResponse | None = None
        try:
            sent = time.perf_counter()
            try:
                up = await pool.request(method, head, data, length, self._head_timeout)
            # TimeoutError (no head within upstream_timeout_seconds) is an OSError too.
            except (UpstreamError, OSError, _BodyTooLarge, BodyError) as exc:
                raise self._upstream_failure(exc, too_large=too_large, malformed=malformed) from None
            self._metrics.upstream_head_seconds.observe(time.perf_counter() - sent)
            new_session = up.header(SESSION_HEADER)
            if new_session is not None:
                new_session = new_session.strip(" \t")
            if new_session and new_session != session_id:
                # Bound durably before the client learns the id, so a next request through any
                # replica finds the binding. An id already bound to another key is not handed
                # out to this one.
                try:
                    owner = await self._bindings.bind(new_session, principal.key_id)
                except Exception:
                    raise ProxyError(503, "store_unavailable", "Cannot record the MCP session; retry") from None
                if owner != principal.key_id:
                    raise ProxyError(403, "session_forbidden", "This MCP session belongs to another key")
            await self._relay(request, up, outcome)
        except asyncio.CancelledError:
            if task in self._streams.cut_tasks:
                # The key was disabled: close the client connection, not just this response.
                request.abort()
            raise
        finally:
            if up is not None:
                up.close()  # pooled only if the answer was read completely, else closed

    def _upstream_failure(self, exc: BaseException, *, too_large: bool, malformed: bool) -> ProxyError:
        """The client's answer when no upstream response head came. The request body's own
        failures come first: they caused whatever the upstream side saw next."""
        if isinstance(exc, PoolExhausted):
            self._metrics.upstream_errors.labels("pool_exhausted").inc()
            return ProxyError(503, "upstream_busy", "Too many requests in flight; retry")
        if too_large or isinstance(exc, _BodyTooLarge):
            return self._too_large()
        if malformed or isinstance(exc, BodyError):
            # The client's body broke its own framing (RFC 9112 7.1): a 400, not an upstream fault.
            return _MalformedBody()
        if isinstance(exc, TimeoutError):
            self._metrics.upstream_errors.labels("timeout").inc()
            return ProxyError(504, "upstream_timeout", "The MCP server did not answer in time")
        self._metrics.upstream_errors.labels("unreachable").inc()
        return ProxyError(502, "upstream_unreachable", "The MCP server is unreachable")

    def _too_large(self) -> ProxyError:
        self._metrics.upstream_errors.labels("body_too_large").inc()
        return _body_too_large(self._settings.max_body_bytes)

    async def _relay(self, request: Request, up: UpstreamResponse, outcome: _Outcome) -> None:
        length = up.content_length
        streaming = up.content_type == "text/event-stream"
        if length is not None and length <= SMALL_BODY and not streaming and request.method != "HEAD":
            # A complete small answer (the common JSON-RPC response): one read, one write of head
            # and body together. SSE and anything large or unbounded streams below.
            try:
                body = await up.read()
            except UpstreamError:
                self._metrics.upstream_errors.labels("reset").inc()
                raise ProxyError(502, "upstream_reset", "The MCP server closed the connection mid-answer") from None
            outcome.status = up.status
            outcome.bytes_out = len(body)
            request.respond(up.status, up.reason, response_headers(up.headers), body)
            return
        outcome.status = up.status
        if not request.start(up.status, up.reason, response_headers(up.headers), length):
            return  # HEAD, 204, 304: the head is the whole answer
        if streaming:
            self._metrics.open_streams.inc()
        try:
            try:
                async for chunk in up.iter_chunks():
                    outcome.bytes_out += len(chunk)
                    await request.write(chunk)
            except UpstreamError:
                # Upstream reset mid-stream: a chunked/SSE response can still end cleanly; one with
                # a Content-Length cannot, so the connection is closed instead of lying.
                self._metrics.upstream_errors.labels("reset").inc()
                if length is not None or not streaming:
                    # Only an event stream can end cleanly here (its events so far are whole); any
                    # other body would read as complete if ended with a last chunk, so the client's
                    # connection is closed instead (RFC 9112 8: an incomplete message).
                    request.abort()
                    return
            await request.finish()
        finally:
            if streaming:
                self._metrics.open_streams.dec()
