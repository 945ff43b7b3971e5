"""The proxy: header filtering, forwarding, streaming both ways, upstream error mapping.

The request's path through here: ``ProxyHandler.__call__`` -> guards (target form, Upgrade,
Origin, declared size) -> ``Authenticator.authenticate`` -> session binding ->
``upstream_header_lines`` (strip credentials and spoofable identity, add ours and the signed
assertion) -> ``request_head`` -> one request on a pooled upstream connection
(``sidecar.http.client``), its body relayed in one piece when small and known, else streamed ->
response head (bounded by ``upstream_timeout_seconds``) -> response body relayed in one piece
when small and known, else streamed chunk by chunk with no total timeout.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.errors import InvalidToken, ProxyError, SidecarError, StoreUnavailable, with_resource_metadata
from sidecar.gate.authenticator import Authenticator
from sidecar.gate.peers import ClientRequest, Network, client_address, is_trusted
from sidecar.gate.principal import PASSTHROUGH, Principal
from sidecar.gate.quota import Quota, RateLimitExceeded, TooManyInFlight
from sidecar.gate.sessions import SessionBindings
from sidecar.gate.tools import ToolPolicy
from sidecar.gate.workspaces import HostWorkspaces
from sidecar.http.client import PoolExhausted, UpstreamError, UpstreamPool, UpstreamResponse
from sidecar.http.server import BodyError, Request
from sidecar.http.wire import reason_phrase
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.proxy.assertion import Signer
from sidecar.proxy.headers import passthrough_header_lines, request_head, response_headers, upstream_header_lines
from sidecar.proxy.mcp import (
    MAX_FILTERED_BYTES,
    NOTHING,
    AnswerFilter,
    Inspection,
    McpGate,
    ToolCallRecorder,
    UnfilterableAnswer,
)
from sidecar.proxy.streams import StreamRegistry
from sidecar.settings import ProxySettings

if TYPE_CHECKING:
    pass  # the error responses are built by sidecar.errors (shared with admin)

SESSION_HEADER = "Mcp-Session-Id"
# Methods whose requests normally carry content (RFC 9110 9.3): without a body they are sent with
# Content-Length: 0, as a general-purpose client would.
_CONTENT_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Bodies with a declared length up to this size are relayed in one piece (see _forward/_relay).
SMALL_BODY = 64 * 1024
# uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): an IP-literal, or a name of unreserved
# characters and percent-escapes, with an optional numeric port.
_VALID_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::[0-9]{0,5})?")


def send_error(request: Request, exc: SidecarError, *, close: bool = False,
               resource_metadata: str | None = None) -> None:
    """Answer ``request`` with ``exc``'s JSON error (see sidecar.errors); a 401's challenge names
    ``resource_metadata`` when given (oauth.mode = "validate")."""
    status, fields, body = exc.render()
    if resource_metadata is not None and status == 401:
        fields = with_resource_metadata(fields, resource_metadata)
    request.respond(status, reason_phrase(status), fields, body, close=close or exc.close)


def _is_json(content_type: str) -> bool:
    # application/json and structured +json types (RFC 6839 3.1).
    return content_type == "application/json" or content_type.endswith("+json")


# Validators describe the upstream's bytes; a filtered answer is other bytes (RFC 9110 8.8).
_VALIDATORS = frozenset({"etag", "last-modified", "content-md5", "digest", "content-digest", "repr-digest"})


def _without_validators(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in fields if name.lower() not in _VALIDATORS]


class _BodyTooLarge(Exception):
    pass


def _visible_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


def _malformed_body() -> ProxyError:
    # After these refusals the connection's remaining bytes are not read: a body we cannot
    # frame, or one we will not take (RFC 9110 15.5.14: on 413 the server MAY close the connection).
    return ProxyError(400, "invalid_request", "Malformed request body", close=True)


def _body_too_large(limit: int) -> ProxyError:
    return ProxyError(413, "body_too_large", f"Request body exceeds {limit} bytes", close=True)


@dataclass(slots=True)
class _Outcome:
    status: int = 0
    bytes_out: int = 0
    mcp: Inspection = NOTHING


class ProxyHandler:
    def __init__(self, settings: ProxySettings, authenticator: Authenticator, signer: Signer,
                 pool: UpstreamPool, metrics: Metrics, log: JsonLog,
                 streams: StreamRegistry, bindings: SessionBindings, activity: ToolCallRecorder,
                 quota: Quota, workspaces: HostWorkspaces | None = None) -> None:
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
        self._mcp = McpGate(metrics, activity)
        self._resource_metadata = authenticator.resource_metadata
        # [workspaces] mode: each request's workspace from its host (sidecar.gate.workspaces).
        self._workspaces = workspaces
        self._quota = quota
        self._max_in_flight = settings.max_concurrent_requests_per_key

    def client_address(self, request: ClientRequest) -> str:
        return client_address(request, self._trusted)

    async def __call__(self, request: Request, caller: Principal | None = None) -> None:
        """Proxy ``request``; ``caller`` is given when no authentication applies (pass-through
        mode's OAuth discovery requests, sidecar.runtime.public_app)."""
        started = time.perf_counter()
        outcome = _Outcome()
        principal: Principal | None = None
        workspace: str | None = None
        try:
            self._guard(request)
            workspace = self._workspaces.of(request) if self._workspaces is not None else None
            principal = caller or await self._auth.authenticate(request, users=True, workspace=workspace)
            await self._forward(request, principal, outcome, started)
        except SidecarError as exc:
            outcome.status = exc.status
            if request.started:
                request.abort()  # too late for an error answer: end the connection instead
            else:
                # A request the guard refused to interpret (bad Host, an upgrade, an odd target):
                # read nothing more from this connection (RFC 9112 9.6, 11.2).
                send_error(request, exc, close=principal is None and isinstance(exc, ProxyError)
                           and exc.status == 400, resource_metadata=self._resource_metadata)
        finally:
            status = outcome.status or 499  # 499: the client went away before an answer
            kind = principal.kind if principal else "none"
            self._metrics.count_request(status, request.method, kind)
            self._metrics.observe_request(request.method, time.perf_counter() - started)
            headers = request.headers
            mcp = outcome.mcp
            self._log.access(
                kind=kind,
                # The request's workspace ([workspaces] mode), else the caller's.
                workspace=workspace or (principal.workspace if principal and principal.kind != PASSTHROUGH else None),
                key_id=principal.key_id if principal else None,
                key_name=principal.name if principal else None,
                client=request.remote, method=request.method, path=request.path,
                # What the body said (both protocol eras); the routing headers only where it was not read.
                mcp_method=mcp.mcp_method if mcp.message or request.body_exists else headers.get("Mcp-Method"),
                mcp_name=mcp.mcp_name if mcp.message or request.body_exists else headers.get("Mcp-Name"),
                status=status,
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
        # (a shared argon2 verification, a slow store read) refuses it here (docs/reference/keys.md: the next
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
        if principal.kind != PASSTHROUGH:
            await self._admit(request, principal)
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is not None:
            # Only sessions issued through this sidecar (and bound in the store before their id
            # reached the client) are forwarded. An id nobody was issued is never passed on, so no
            # spelling the upstream might read as another key's session can reach it; 404 is what
            # the MCP transport (Streamable HTTP, session management) answers for an unknown
            # session, and tells the client to start a new one.
            # MCP session ids are visible ASCII (Streamable HTTP, session management): anything
            # else was never issued, and is not worth a store read.
            if not _visible_ascii(session_id):
                raise ProxyError(404, "session_not_found", "Unknown MCP session; start a new one")
            try:
                owner = await self._bindings.owner(session_id)
            except Exception:
                self._metrics.store_unavailable.inc()
                raise StoreUnavailable() from None
            if owner is None:
                raise ProxyError(404, "session_not_found", "Unknown MCP session; start a new one")
            if owner != principal.key_id:
                raise ProxyError(403, "session_forbidden", "This MCP session belongs to another key")
            self._bindings.seen(session_id)
        pool = self._pool
        # htu is the target the upstream receives: the upstream's base path + the client's target.
        target = pool.base_path + request.raw_path
        if principal.kind == PASSTHROUGH:
            # The upstream authenticates this one itself: its token passes, no identity is added.
            fields = passthrough_header_lines(
                request.headers.items(), peer=request.remote or "unknown",
                peer_trusted=is_trusted(request.remote, self._trusted), proto=request.scheme, host=request.host)
        else:
            fields = upstream_header_lines(
                request.headers.items(), principal=principal,
                assertion=self._signer.sign(principal, request.method, target),
                peer=request.remote or "unknown", peer_trusted=is_trusted(request.remote, self._trusted),
                proto=request.scheme, host=request.host,
            )
        too_large = False
        malformed = False
        policy = principal.tools
        # A streamed POST body of a key without a tool policy is kept as it passes, so that its
        # tools/call is still recorded (bounded by max_body_bytes, like the body itself).
        kept: bytearray | None = bytearray() if request.method == "POST" else None

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
                    if kept is not None:
                        kept.extend(chunk)
                    yield chunk
                if kept is not None:
                    outcome.mcp = self._mcp.note_streamed(
                        headers=request.headers, body=bytes(kept), principal=principal,
                        client=self.client_address(request))
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
        elif ((length is not None and length <= SMALL_BODY) or policy is not None
              or "Mcp-Method" in request.headers or "Mcp-Name" in request.headers):
            # A small body with a declared length is one complete JSON-RPC message already in
            # the socket buffer: relaying it in one piece (head and body in one write) saves the
            # per-chunk machinery (bench/RESULTS.md: body streaming is ~17% of a bare proxy's cost).
            # Anything chunked, larger, or without a length streams chunk by chunk.
            # Usually the whole body came with the head: take it without a wait.
            # A key with a tool policy has every body read before anything is forwarded, whatever
            # its size or framing (up to max_body_bytes): a call that could not be checked is not
            # sent. So has any body with routing headers, which must agree with it.
            if request.body_complete:
                data = request.take_body()
            else:
                data = await self._read_whole_body(request)
            if length is not None and len(data) != length:
                raise _malformed_body()
            framing = f"Content-Length: {len(data)}\r\n"
        else:
            data = body()
            framing = "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
        inspection = self._mcp.inspect(method=method, headers=request.headers,
                                       body=data if isinstance(data, bytes) else None,
                                       principal=principal, client=self.client_address(request))
        outcome.mcp = inspection
        answer = inspection.answer
        if answer is not None:
            # A tools/call this key may not make: answered here, never forwarded.
            outcome.status = answer.status
            outcome.bytes_out = len(answer.body)
            request.respond(answer.status, reason_phrase(answer.status), answer.fields, answer.body)
            return
        if policy is not None:
            # A tool list is filtered as JSON; an upstream must not compress it out of reach
            # (RFC 9110 12.5.3: "identity" asks for no content coding).
            fields = [(n, v) for n, v in fields if n.lower() != "accept-encoding"]
            fields.append(("Accept-Encoding", "identity"))
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
            if new_session and new_session != session_id and _visible_ascii(new_session):
                # Bound durably before the client learns the id, so a next request through any
                # replica finds the binding. An id already bound to another key is not handed
                # out to this one.
                try:
                    owner = await self._bindings.bind(new_session, principal.key_id)
                except Exception:
                    self._metrics.store_unavailable.inc()
                    raise StoreUnavailable() from None
                if owner != principal.key_id:
                    raise ProxyError(403, "session_forbidden", "This MCP session belongs to another key")
            await self._relay(request, up, outcome, inspection.filter)
        except asyncio.CancelledError:
            if task in self._streams.cut_tasks:
                # The key was disabled: close the client connection, not just this response.
                request.abort()
            raise
        finally:
            if up is not None:
                up.close()  # pooled only if the answer was read completely, else closed

    async def _admit(self, request: Request, principal: Principal) -> None:
        """The key's limits (docs/reference/limits.md): its requests in flight, this one
        included (it is registered already, so concurrent arrivals cannot all pass a check made
        before either counts), then its rate. One key's traffic never refuses another key's.
        A counted request's answer, whatever it is (the upstream's, a refused call, a failure
        after counting), carries the key's RateLimit fields so that the agent can pace itself."""
        bound = self._max_in_flight
        if bound and self._streams.in_flight(principal.key_id) > bound:
            self._metrics.limited["concurrency"].inc()
            raise TooManyInFlight(bound)
        limit = principal.rate_limit
        if limit is not None:
            verdict = await self._quota.take(principal.key_id, limit)
            if not verdict.allowed:
                self._metrics.limited["rate"].inc()
                raise RateLimitExceeded(verdict, limit)
            request.add_response_fields(verdict.fields)

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
            return _malformed_body()
        if isinstance(exc, TimeoutError):
            self._metrics.upstream_errors.labels("timeout").inc()
            return ProxyError(504, "upstream_timeout", "The MCP server did not answer in time")
        self._metrics.upstream_errors.labels("unreachable").inc()
        return ProxyError(502, "upstream_unreachable", "The MCP server is unreachable")

    def _unfilterable(self) -> ProxyError:
        self._metrics.upstream_errors.labels("unfilterable").inc()
        return ProxyError(502, "upstream_unfilterable",
                          "The MCP server's answer cannot be filtered for this key (too large, or not readable JSON)")

    async def _read_bounded(self, up: UpstreamResponse) -> bytes:
        whole = bytearray()
        async for chunk in up.iter_chunks():
            if len(whole) + len(chunk) > MAX_FILTERED_BYTES:
                raise self._unfilterable()
            whole += chunk
        return bytes(whole)

    def _too_large(self) -> ProxyError:
        self._metrics.upstream_errors.labels("body_too_large").inc()
        return _body_too_large(self._settings.max_body_bytes)

    async def _read_whole_body(self, request: Request) -> bytes:
        """The request body in one piece, bounded in size (max_body_bytes) and in time like a
        streamed body is (by the upstream head deadline): a client that stops sending mid-body
        must not hold the connection and handler for good."""
        limit = self._settings.max_body_bytes
        whole = bytearray()
        try:
            async with asyncio.timeout(self._head_timeout):
                async for chunk in request.iter_body():
                    if len(whole) + len(chunk) > limit:
                        raise self._too_large()
                    whole += chunk
        except BodyError:
            raise _malformed_body() from None
        except TimeoutError:
            raise ProxyError(408, "request_timeout", "The request body did not arrive in time",
                             close=True) from None
        return bytes(whole)

    async def _relay(self, request: Request, up: UpstreamResponse, outcome: _Outcome,
                     policy: ToolPolicy | None) -> None:
        length = up.content_length
        streaming = up.content_type == "text/event-stream"
        answer_filter: AnswerFilter | None = None
        if policy is not None and request.method != "HEAD":
            answer_filter = AnswerFilter(policy, self._metrics)
            coding = up.header("Content-Encoding")
            if coding is not None and coding.strip().lower() not in ("", "identity"):
                self._metrics.upstream_errors.labels("unfilterable").inc()
                raise ProxyError(502, "upstream_unfilterable",
                                 "The MCP server's answer is compressed and cannot be filtered for this key")
            if not streaming and _is_json(up.content_type):
                # A tool list may be large (any number of tools, split across many reads): the
                # whole JSON answer is read, within a bound, and filtered before it is sent.
                if length is not None and length > MAX_FILTERED_BYTES:
                    raise self._unfilterable()
                try:
                    body = answer_filter.json(await self._read_bounded(up))
                except UpstreamError:
                    self._metrics.upstream_errors.labels("reset").inc()
                    raise ProxyError(502, "upstream_reset", "The MCP server closed the connection mid-answer") from None
                except UnfilterableAnswer:
                    raise self._unfilterable() from None
                outcome.status = up.status
                outcome.bytes_out = len(body)
                request.respond(up.status, up.reason, _without_validators(response_headers(up.headers)), body)
                return
            if streaming:
                length = None  # events may change length: the answer is re-framed (chunked)
            else:
                answer_filter = None  # neither JSON nor events: no JSON-RPC answer to filter
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
        fields = response_headers(up.headers)
        if answer_filter is not None:
            fields = _without_validators(fields)
        if not request.start(up.status, up.reason, fields, length):
            return  # HEAD, 204, 304: the head is the whole answer
        if streaming:
            self._metrics.open_streams.inc()
        try:
            try:
                async for chunk in up.iter_chunks():
                    if answer_filter is not None:
                        try:
                            chunk = answer_filter.feed(chunk)
                        except UnfilterableAnswer:
                            # Too late for an error answer: the stream ends rather than carry an
                            # event that could not be checked.
                            self._metrics.upstream_errors.labels("unfilterable").inc()
                            request.abort()
                            return
                        if not chunk:
                            continue
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
