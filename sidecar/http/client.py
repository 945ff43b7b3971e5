"""The upstream client: a keep-alive pool of HTTP/1.1 connections to the one MCP server.

Why not ``aiohttp.ClientSession``: the sidecar always talks to a single origin with a request it
has already framed and filtered, so the general client's per-request work (URL objects, header
merging, auto headers, a ``ClientRequest`` and ``ClientResponse`` with their payload streams,
cookie and redirect handling) was the largest single cost of a proxied request (see
``bench/RESULTS.md``). Here a request is one pre-serialised head written with its small body in a
single ``write``, and the response is parsed by ``httptools`` (llhttp, the parser Node.js and
aiohttp build on) straight into a list of chunks.

Semantics kept from the general client, with the RFC that asks for them:
- a connection is reused only after its response was read completely and both sides allow
  keep-alive (RFC 9112 9.3); anything half-read is closed, never pooled;
- a response without Content-Length or chunked framing ends when the connection closes
  (RFC 9112 6.3 item 8), and such a connection is not reused;
- 1xx interim responses are skipped (RFC 9110 15.2); a HEAD response has no body (RFC 9110 9.3.2);
- a request that failed on a reused connection before any byte of an answer arrived is retried
  once on a new connection only if its method is idempotent and its body is in memory
  (RFC 9112 9.3.1: a proxy MUST NOT retry non-idempotent requests automatically); pooled
  connections are dropped after a short idle time, below common servers' keep-alive timeouts,
  to keep that race rare;
- a response body is buffered up to a bound, then the socket stops being read until the
  consumer catches up (back-pressure, so a slow client never makes the sidecar buffer a stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from sidecar.http.deadline import Deadline

# RFC 9110 9.2.2.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Idle pooled connections older than this are closed: below the 5 s keep-alive timeout of
# uvicorn, hypercorn and Node, so the upstream rarely closes one just as it is reused.
IDLE_SECONDS = 4.0
# Response bytes held for a slow consumer before the upstream socket stops being read.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# Bound on a response head, as for a request head (aiohttp's server default is 8 KB per field).
_MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not give an answer; ``kind`` is the metrics label."""

    kind = "unreachable"


class PoolExhausted(UpstreamError):
    kind = "pool_exhausted"


class Unreachable(UpstreamError):
    kind = "unreachable"


class Disconnected(UpstreamError):
    """The connection closed or broke before the response head was complete."""

    kind = "unreachable"


class ResponseReset(UpstreamError):
    """The connection closed or broke in the middle of a response body."""

    kind = "reset"


class _Conn(asyncio.Protocol):
    """One upstream connection; carries at most one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = True      # still counted in the pool's open connections
        self.reused = False
        self.idle_since = 0.0
        self.busy = False
        # The current exchange.
        self.head: asyncio.Future[None] | None = None
        self.head_only = False
        self.got_bytes = False
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.field_bytes = 0
        self.interim = False
        self.until_eof = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.data_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        # The wait for a response head is bounded by one lazily re-armed Deadline per connection,
        # not a timer per request (asyncio.timeout schedules and cancels one each time, which
        # showed in the profile).
        self.head_deadline = Deadline(pool.loop, self._head_late)

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for (after a complete answer, or on an idle connection): the
            # framing can no longer be trusted, so the connection goes.
            self.close()
            return
        self.got_bytes = True
        if not self.headers_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:
                # The error is in bytes after a complete answer (see on_message_begin): the answer
                # stands, the rest is discarded (RFC 9112 6.3) and the connection closed.
                self.close()
                return
            self._fail(Disconnected(f"invalid response from upstream: {exc}") if not self.headers_done
                       else ResponseReset("invalid response body from upstream"))
            self.close()
            return
        if not self.headers_done and self.head_bytes > _MAX_HEAD_BYTES:
            # llhttp accumulates a reason phrase or an unfinished field value without a limit of
            # its own, before any callback could count it: the head is bounded by the bytes read.
            self._fail(Disconnected("upstream response head too large"))
            self.close()

    def eof_received(self) -> bool:
        if not self.busy or self.complete:
            # The upstream ended a connection whose answer is complete (or that is idle): mark it
            # unusable now, so that a request handed this connection in the same loop iteration
            # (before connection_lost runs) does not write into it and fail as a 502.
            self.close()
        return False  # close the transport; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.head_deadline.cancel()
        self.pool._forget(self)
        if self.busy and not self.complete:
            if self.headers_done and self.until_eof and exc is None:
                self.complete = True  # RFC 9112 6.3 item 8: the close ends the body
                self._wake()
            elif not self.headers_done:
                self._fail(Disconnected("upstream closed the connection"))
            else:
                self._fail(ResponseReset("upstream closed the connection mid-body"))
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("upstream connection lost"))
        self.drain_waiter = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.drain_waiter = None

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            # More bytes after the final answer, in the same read (say its Content-Length undercounts):
            # RFC 9112 6.3, a client MUST NOT process them as a separate response. Parsing on would
            # overwrite this answer's status and fields and append to its body; stop here instead.
            raise ValueError("data after the end of the response")
        self.reason = b""
        self.raw_headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # A complete head that came in one read is bounded here (data_received bounds the rest).
        self.field_bytes += len(name) + len(value)
        if self.field_bytes > _MAX_HEAD_BYTES:
            raise ValueError("response head too large")
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Interim response (RFC 9110 15.2): skipped; 101 is never asked for (Upgrade is refused).
            if status == 101:
                raise ValueError("unexpected 101 from upstream")
            self.interim = True
            return
        self.status = status
        self.headers_done = True
        if self.head_only or status in (204, 304):
            if self.head_only:
                # llhttp cannot be told the request was HEAD, so it would wait for a body that
                # never comes: the answer ends here and the connection is not reused.
                self.complete = True
                self.keep_alive = False
        else:
            # RFC 9112 6.3: Transfer-Encoding wins over Content-Length, and a response whose final
            # coding is not chunked is read until the connection closes (item 4).
            coding: bytes | None = None
            length = False
            for name, value in self.raw_headers:
                lower = name.lower()
                if lower == b"transfer-encoding":
                    coding = value.rsplit(b",", 1)[-1].strip().lower()
                elif lower == b"content-length":
                    length = True
            self.until_eof = coding != b"chunked" if coding is not None else not length
        self.head_deadline.disarm()
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.complete:
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive() and not self.until_eof
        self._wake()

    # -- exchange ----------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.data_waiter = None

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved here too: the waiter may already be gone
        self._wake()

    def start(self, method: str, head_timeout: float) -> None:
        loop = self.pool.loop
        self.busy = True
        self.head = loop.create_future()
        self.head_deadline.arm(head_timeout)
        self.head_only = method == "HEAD"
        self.got_bytes = self.interim = self.until_eof = self.headers_done = False
        self.complete = self.keep_alive = False
        self.status = 0
        self.head_bytes = self.field_bytes = 0
        self.error = None
        self.chunks.clear()
        self.buffered = 0

    def _head_late(self) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(TimeoutError())

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("upstream connection lost")
        if self.write_paused:
            waiter = self.drain_waiter = self.pool.loop.create_future()
            await waiter

    async def write_body(self, body: AsyncIterator[bytes], length: int | None) -> None:
        """Stream a request body: as-is under a Content-Length, else chunked (RFC 9112 7.1)."""
        transport = self.transport
        assert transport is not None
        try:
            sent = 0
            async for chunk in body:
                if not chunk:
                    continue
                if self.closed:
                    raise ConnectionResetError("upstream connection lost")
                if length is None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    sent += len(chunk)
                    if sent > length:
                        # Bytes past the Content-Length would be read by the upstream as the next
                        # request on this connection (RFC 9112 6.3, 11.2: request smuggling).
                        raise ConnectionResetError("request body longer than its Content-Length")
                    transport.write(chunk)
                await self.drain()
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise ConnectionResetError("request body shorter than its Content-Length")
        except Exception as exc:
            # The body source failed (too large, broken framing from the client, the client went
            # away): the upstream must not see a request that looks complete, so the connection
            # is aborted, and whoever waits for the answer gets the reason.
            self._fail(exc)
            self.close()

    async def wait_data(self) -> None:
        waiter = self.data_waiter = self.pool.loop.create_future()
        await waiter

    def take(self) -> bytes:
        """Everything buffered so far, as one ``bytes``."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """The exchange is over: pool the connection if it is clean, else close it."""
        writer = self.writer
        self.writer = None
        clean = (self.complete and self.keep_alive and not self.chunks and self.error is None
                 and not self.closed and (writer is None or (writer.done() and not writer.cancelled()
                                                             and writer.exception() is None)))
        if writer is not None and not writer.done():
            writer.cancel()
        self.busy = False
        self.head = None
        self.head_deadline.disarm()
        if clean:
            self.pool._release(self)
        else:
            self.close()

    def usable(self) -> bool:
        """Open for a new request: not closed, not closing (the upstream's FIN already seen)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.head_deadline.cancel()
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
        self.pool._forget(self)


class UpstreamResponse:
    """The answer to one request: status, reason, headers; the body is read or iterated once,
    then ``close()`` hands the connection back (or closes it)."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "reason", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")
        # utf-8 with surrogateescape, as aiohttp decodes fields: bytes round-trip unchanged.
        self.headers = [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                        for n, v in conn.raw_headers]
        self.content_length: int | None = None
        self.content_type = ""
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                self.content_length = int(value)  # llhttp accepted it: digits only, no duplicates
            elif lower == "content-type":
                self.content_type = value.split(";", 1)[0].strip().lower()

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body (for answers known to be small)."""
        conn = self._conn
        if conn is None:
            raise ResponseReset("response already closed")
        parts: list[bytes] = []
        while True:
            if conn.chunks:
                parts.append(conn.take())
            if conn.complete:
                # Complete wins over a later error (e.g. the request body's writer failing after
                # an early, complete answer): the answer the upstream gave is the answer.
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn.error is not None:
                raise ResponseReset(str(conn.error))
            await conn.wait_data()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, whatever is buffered at each step in one piece."""
        conn = self._conn
        if conn is None:
            raise ResponseReset("response already closed")
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise ResponseReset(str(conn.error))
            await conn.wait_data()

    def close(self) -> None:
        """Hand the connection back (or close it); later calls do nothing, so a connection that
        may already carry another exchange is never released twice."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish()


class UpstreamPool:
    """Keep-alive connections to one origin, at most ``max_connections`` open; a request that
    finds none free waits up to ``pool_timeout`` (then ``PoolExhausted``)."""

    def __init__(self, url: str, *, max_connections: int, pool_timeout: float,
                 connect_timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        # RFC 9110 7.2: Host is the upstream's own authority, port omitted when it is the default.
        self.authority = host if self.port == default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._max = max_connections
        self._pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        self._idle: collections.deque[_Conn] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (open ones include slots handed to a waiter)."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def request(self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None,
                      body_length: int | None, head_timeout: float) -> UpstreamResponse:
        """Send ``head`` (request line and fields, framing included, ending in a blank line) and
        ``body``; return once the response head is in. ``head_timeout`` bounds the wait for that head
        after the request went out; waiting for a pooled connection and connecting have their own
        bounds (``pool_timeout``, ``connect_timeout``)."""
        retry = method in IDEMPOTENT and not isinstance(body, AsyncIterator)
        while True:
            conn = await self._acquire()
            if not conn.usable():
                # Handed over by _release, then lost or half-closed before this task woke up: a
                # request written to it would get neither an answer nor an error. Closing it frees
                # its slot (_forget): look again.
                conn.close()
                continue
            conn.start(method, head_timeout)
            transport = conn.transport
            assert transport is not None and conn.head is not None
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                transport.write(head + body if len(body) <= 16384 else head)
                if len(body) > 16384:
                    transport.write(body)
            else:
                transport.write(head)
                conn.writer = asyncio.create_task(conn.write_body(body, body_length))
            try:
                await conn.head  # TimeoutError after head_timeout (see _Conn._head_check)
            except Disconnected:
                reused, silent = conn.reused, not conn.got_bytes
                conn.finish()
                if retry and reused and silent:
                    retry = False
                    continue
                raise
            except BaseException:
                conn.finish()
                raise
            return UpstreamResponse(conn)

    async def _acquire(self) -> _Conn:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.usable() or now - conn.idle_since > IDLE_SECONDS:
                conn.close()
                continue
            conn.reused = True
            return conn
        if self._open < self._max:
            self._open += 1
            return await self._connect()
        waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._pool_timeout):
                handed = await waiter
        except TimeoutError:
            self._give_up(waiter)
            raise PoolExhausted("no upstream connection free in time") from None
        except BaseException:
            self._give_up(waiter)
            raise
        if handed is not None:
            handed.reused = True
            return handed
        # A slot was handed over (a connection closed), still counted in _open: connect in it.
        return await self._connect()

    def _give_up(self, waiter: asyncio.Future[_Conn | None]) -> None:
        """A waiter stops waiting (timed out, cancelled). The timeout can fire in the same loop
        iteration as a hand-over: what it was handed goes on, or a slot would be lost for good."""
        if not waiter.done():
            waiter.cancel()
        if waiter.cancelled():
            # (asyncio.timeout and task cancellation cancel it first.) Out of the queue at once: no
            # pile of dead waiters while the pool stays full.
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            return
        if waiter.exception() is not None:
            return
        given = waiter.result()
        if given is None:
            self._free_slot()
        elif given.usable():
            self._release(given)
        else:
            given.close()

    async def _connect(self) -> _Conn:
        """A new connection in a slot already counted in ``_open`` (the caller's)."""
        conn = _Conn(self)
        if self._closed:
            conn.closed = True
            self._forget(conn)
            raise Unreachable("upstream pool closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            conn.closed = True
            self._forget(conn)
            raise Unreachable(f"cannot connect to the upstream: {exc}") from None
        except BaseException:
            conn.closed = True
            self._forget(conn)
            raise
        return conn

    def _release(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        if conn.counted:
            conn.counted = False
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        """A slot is free: it goes to the first waiter, still counted (so that no new request can
        take it in between and open one connection too many), or else it is uncounted."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def expire_idle(self) -> None:
        """Close pooled connections idle for longer than ``IDLE_SECONDS`` (oldest first)."""
        now = time.monotonic()
        idle = self._idle
        while idle and now - idle[0].idle_since > IDLE_SECONDS:
            idle.popleft().close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                # An error, not a cancelled future: a CancelledError here would read, in the
                # waiting task, as if the task itself had been cancelled.
                waiter.set_exception(Unreachable("upstream pool closed"))
