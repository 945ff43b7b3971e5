"""The public listener: an HTTP/1.1 server (RFC 9112) made for this one port.

The public port serves three fixed answers and one proxy route, so a general web framework's
server costs more than it gives: aiohttp's server side was a third of a proxied request's CPU
(bench/RESULTS.md). Here an ``asyncio.Protocol`` feeds llhttp (through ``httptools``, in its
strict mode) and hands each complete request head to one ``dispatch`` coroutine, one at a time
per connection. What this module owns, each rule tested over raw sockets (tests/test_hardening_*,
tests/test_fuzz_listener.py, tests/test_listener.py):

* framing: llhttp refuses CL+TE together, duplicate or non-numeric Content-Length, a final
  coding other than chunked, obs-fold, bare CR/LF, NUL and spaces before the colon; on top of
  it a request head is bounded (target, field, field count, total) and singleton fields
  (Host, Content-Length, Content-Type, ...) may appear once. Any of these: a JSON 400 (414/431
  for sizes; 501 for a coding before chunked, 417 for an unknown expectation, 505 for a version
  other than HTTP/1.x), then the connection is closed and nothing of it is dispatched;
* time: a request head must be complete within ``head_timeout`` of its first byte (of the
  connection, for the first one): slowloris; an idle kept-alive connection is closed after
  ``keepalive_timeout``;
* one request at a time, answers in order (RFC 9112 9.3.2): bytes behind a request that waits
  its turn are held unparsed (bounded, as is the number of requests parsed ahead); reading pauses
  only for back-pressure (a request body past its high-water mark, answers the client does not
  read), so a client that goes away is noticed at once;
* ``Expect: 100-continue`` is answered when the handler first reads the body, so a refused
  request never invites its body (RFC 9110 10.1.1);
* a response is framed by Content-Length, chunked (HTTP/1.1) or by closing (HTTP/1.0); HEAD,
  204 and 304 carry no body (RFC 9110 6.4.1); write back-pressure pauses the handler;
* a client that goes away cancels its handler at once (so the upstream request closes);
* closing is staged (RFC 9112 9.6): FIN once the last answer is out, then what the client still
  sends is read and dropped for a while, so a reset cannot destroy the answer;
* drain: ``stop_accepting`` closes idle connections and lets in-flight ones finish, after which
  they close.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

from sidecar.http.deadline import Deadline
from sidecar.http.wire import error_body, http_date, reason_phrase
from sidecar.logs import JsonLog

# Request head limits, as common servers set them (aiohttp and nginx: 8 KB lines).
MAX_TARGET = 8190
MAX_FIELD = 8190
MAX_FIELDS = 128
MAX_HEAD = 64 * 1024
# A closing connection keeps reading (and discarding) this long after its last answer went out;
# an answer the client stops reading for SEND_STALL_SECONDS is abandoned.
LINGER_SECONDS = 2.0
SEND_STALL_SECONDS = 30.0
_LINGER_TICK = 0.5
# Requests parsed ahead of their answers (pipelining), and bytes held behind them unparsed.
MAX_PIPELINED = 16
MAX_HELD = 64 * 1024
# A request body is buffered up to this much before reading from the socket pauses.
BODY_HIGH_WATER = 256 * 1024
# Body pieces under SMALL_PIECE bytes are merged into buffers of up to MERGED_PIECE bytes. After
# MAX_SMALL_PIECES pieces, a body averaging under AVERAGE_PIECE bytes a piece is refused (400).
SMALL_PIECE = 4096
MERGED_PIECE = 64 * 1024
MAX_SMALL_PIECES = 4096
AVERAGE_PIECE = 64
# Fields that must not repeat: a second value makes the request ambiguous to whoever reads it
# next (RFC 9112 3.2 for Host; RFC 9110 8.3 and 8.6 for the content fields).
# Mcp-Session-Id too: the sidecar checks the session's owner on one value, and an upstream that
# reads another copy of a repeated field would act on a session that was never checked.
_SINGLETONS = frozenset({b"host", b"content-type", b"content-length", b"content-location", b"content-range",
                         b"max-forwards", b"mcp-session-id"})
_NO_BODY_STATUS = frozenset({204, 304})
_OWS = (b" ", b"\t")

Dispatch = Callable[["Request"], Awaitable[None]]


class BodyError(Exception):
    """The request body broke its framing (RFC 9112 7.1) or the client stopped sending it."""


class _Refusal(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Request:
    """One request: its head (named as aiohttp's request names it, for the parts the sidecar reads),
    its body as it arrives, and the means to answer it exactly once."""

    __slots__ = ("_buffered", "_chunked_out", "_chunks", "_close", "_complete", "_conn", "_continue",
                 "_error", "_extra", "_finished", "_pieces", "_received", "_started", "_waiter", "chunked",
                 "content_length", "headers", "keep_alive", "method", "raw_path", "remote", "version")

    scheme = "http"

    def __init__(self, conn: _Connection, method: str, target: str, version: tuple[int, int],
                 headers: CIMultiDict[str], content_length: int | None, chunked: bool, keep_alive: bool,
                 expect_continue: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = target
        self.version = version
        self.headers = headers
        self.remote = conn.remote
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self._continue = expect_continue
        self._chunks: deque[bytes | bytearray] = deque()
        self._buffered = 0
        self._pieces = 0  # body pieces the parser handed over, and their bytes
        self._received = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._finished = False
        self._chunked_out = False
        self._close = False
        self._extra: list[tuple[str, str]] | tuple[()] = ()

    # -- the head ----------------------------------------------------------------------------

    @property
    def path(self) -> str:
        path = self.raw_path.partition("?")[0].partition("#")[0]
        return unquote(path) if "%" in path else path

    @property
    def query_string(self) -> str:
        query = self.raw_path.partition("?")[2].partition("#")[0]
        return unquote(query) if "%" in query else query

    @property
    def host(self) -> str:
        """The Host the client named, else (HTTP/1.0 without one) the address it connected to."""
        return self.headers.get("Host") or self._conn.local

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    # -- the body ----------------------------------------------------------------------------

    @property
    def body_complete(self) -> bool:
        """The whole body is here (or there is none): :meth:`take_body` returns it at once."""
        return self._complete and self._error is None

    def take_body(self) -> bytes:
        chunks = self._chunks
        data = bytes(chunks.popleft()) if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._consumed(len(data))
        return data

    async def read_body(self) -> bytes:
        parts = []
        async for chunk in self.iter_body():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises :class:`BodyError` if its framing breaks."""
        if self._continue:
            self._continue = False
            if not self._complete and not self._chunks and not self._conn.closing:
                # RFC 9110 10.1.1: the client waits for this before it sends the body.
                self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._consumed(len(data))
                yield bytes(data) if isinstance(data, bytearray) else data
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _consumed(self, size: int) -> None:
        self._buffered -= size
        self._conn.update_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        size = len(data)
        self._pieces += 1
        self._received += size
        if self._pieces > MAX_SMALL_PIECES and self._received < AVERAGE_PIECE * self._pieces:
            # A body in thousands of tiny pieces (1-byte chunks, say) costs a parser callback and
            # an object per piece: refused before it costs more than its size (RFC 9112 7.1 sets
            # no minimum chunk size; this server does).
            raise _Refusal(400)
        chunks = self._chunks
        if size < SMALL_PIECE:
            # Small pieces are merged into one buffer as they come, not kept one object each.
            last = chunks[-1] if chunks else None
            if type(last) is bytearray and len(last) < MERGED_PIECE:
                last += data
            else:
                chunks.append(bytearray(data))
        else:
            chunks.append(data)
        self._buffered += size
        self._wake()

    def _done(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._complete:
            self._error = exc
            self._wake()

    # -- the answer ----------------------------------------------------------------------------

    def respond(self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                close: bool = False) -> None:
        """The whole answer in one write."""
        no_body = status in _NO_BODY_STATUS or status < 200
        framing = "" if no_body else f"Content-Length: {len(body)}\r\n"
        head = self._head(status, reason, headers, framing, close)
        if no_body or self.method == "HEAD":
            self._conn.write(head)
        else:
            self._conn.write(head + body)
        self._finished = True

    def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None) -> bool:
        """Send the head of a streamed answer; False when it has no body to stream."""
        if status in _NO_BODY_STATUS or self.method == "HEAD":
            framing = f"Content-Length: {length}\r\n" if length is not None and status not in _NO_BODY_STATUS else ""
            self._conn.write(self._head(status, reason, headers, framing, False))
            self._finished = True
            return False
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        elif self.version >= (1, 1):
            framing = "Transfer-Encoding: chunked\r\n"
            self._chunked_out = True
        else:
            # RFC 9112 6.3 (8): an HTTP/1.0 client reads an unframed body until the connection closes.
            framing = ""
            self._close = True
        self._conn.write(self._head(status, reason, headers, framing, self._close))
        return True

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn.closing:
            raise ConnectionResetError("the client connection is closed")
        if self._chunked_out:
            if not data:
                return  # an empty chunk would read as the last one (RFC 9112 7.1)
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        if conn.write_paused:
            await conn.drain()

    async def finish(self) -> None:
        if self._chunked_out:
            self._conn.write(b"0\r\n\r\n")
        self._finished = True
        if self._conn.write_paused:
            await self._conn.drain()

    def abort(self) -> None:
        """End the connection now: the answer cannot be completed, or must not be."""
        self._close = True
        self._conn.close_gently()

    def add_response_fields(self, fields: list[tuple[str, str]]) -> None:
        """Fields the answer carries whatever it turns out to be (the upstream's, or an error
        of the application's), written after the ones it is given."""
        self._extra = fields

    def _head(self, status: int, reason: str, headers: Iterable[tuple[str, str]], framing: str, close: bool) -> bytes:
        if self._started:
            raise RuntimeError("the response has started already")
        self._started = True
        if close:
            self._close = True
        if not (reason.isascii() and reason.isprintable()):
            # RFC 9112 4: reason-phrase is HTAB / SP / VCHAR / obs-text; control bytes never pass.
            reason = reason_phrase(status)
        parts = [f"HTTP/1.1 {status} {reason}\r\n"]
        has_date = False
        for name, value in headers:
            if not has_date and len(name) == 4 and name.lower() == "date":
                has_date = True
            parts.append(f"{name}: {value}\r\n")
        for name, value in self._extra:
            parts.append(f"{name}: {value}\r\n")
        if not has_date:
            # RFC 9110 6.6.1: a recipient with a clock forwarding a response without Date adds one.
            parts.append(f"Date: {http_date()}\r\n")
        parts.append(framing)
        if not self._complete:
            # Answered before its body was read: the rest of the body is not read, so the
            # connection closes after this answer, and says so (RFC 9112 9.6, RFC 9110 10.1.1).
            self._close = True
        if self._close or not self.keep_alive or self._conn.closing_after:
            parts.append("Connection: close\r\n")
        elif self.version < (1, 1):
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        # utf-8 with surrogateescape reverses how field values were decoded: bytes pass unchanged.
        return "".join(parts).encode("utf-8", "surrogateescape")

    @property
    def started(self) -> bool:
        return self._started


class _Connection(asyncio.Protocol):
    """One client connection: parsing, timers, flow control, one handler at a time.

    Reading stays on except for back-pressure (a request body buffered past its high-water mark,
    answers the client does not read, a long pipelined backlog), so a client that goes away is
    noticed at once, whatever state its requests are in."""

    def __init__(self, server: Listener) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.local = ""
        self._queue: deque[Request] = deque()  # heads complete, waiting their turn
        self._held = bytearray()  # bytes after a waiting request, parsed when its turn comes
        self._parsing: Request | None = None  # the request whose body is being received
        self._current: Request | None = None  # the request being handled
        self._task: asyncio.Task[None] | None = None
        # The head being parsed.
        self._in_head = False
        self._head_bytes = 0  # bytes received outside bodies since the last head completed
        self._read_spent = 0  # bytes of the current read that earlier messages took (as parsed)
        self._head_from = -1  # where in the current read the head being parsed began, if it did
        self._since_body = 0  # bytes received inside a body since its last data (framing, trailers)
        self._head_size = 0  # the current head's target and fields, as parsed
        self._target: list[bytes] = []
        self._target_len = 0
        self._fields: list[tuple[str, str]] = []
        self._seen: set[bytes] = set()
        self._content_length: int | None = None
        self._chunked = False
        self._expect_continue = False
        self._expect_other = False
        # No more requests are parsed (a refusal, an upgrade, closing); input is read and dropped.
        self._input_closed = False
        self._refusal: int | None = None  # an answer owed once the requests before it are answered
        self._reading_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_buffered = 0
        self.closing = False
        self.closing_after = False  # the listener is draining: close after the current answer
        # One deadline and at most one timer (re-armed lazily): the head deadline while a head is
        # awaited, the keep-alive bound while idle between requests, none while one is handled;
        # once closing, the same timer watches the last answer go out.
        self._deadline = Deadline(self._loop, self._deadline_passed)
        self._timer: asyncio.TimerHandle | None = None  # the linger after a staged close
        self._idle = False  # the deadline is the keep-alive bound
        self._linger_since = 0.0
        self._linger_buffered = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport, hence no isinstance.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local = f"[{sock[0]}]:{sock[1]}" if ":" in str(sock[0]) else f"{sock[0]}:{sock[1]}"
        self._server.connections.add(self)
        self._arm(self._server.head_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self._input_closed = True
        self._server.connections.discard(self)
        self._deadline.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        cut = BodyError("the client closed the connection")
        for request in (self._parsing, self._current, *self._queue):
            if request is not None:
                request._fail(cut)
        self._queue.clear()
        self._held.clear()
        if self._task is not None and not self._task.done():
            # The client is gone: stop the handler now, which closes its upstream request.
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client connection is closed"))
            self._drain.exception()  # retrieved: nobody may be waiting

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and self._stall_timer is None:
            self._stall_buffered = self.transport.get_write_buffer_size()
            self._stall_timer = self._loop.call_later(SEND_STALL_SECONDS, self._stall_check)
        self.update_reading()

    def _stall_check(self) -> None:
        """A client that stops reading its answers (or its event stream) for SEND_STALL_SECONDS
        is cut: its handler, upstream connection and buffers are not held for it forever."""
        self._stall_timer = None
        transport = self.transport
        if not self.write_paused or transport is None or self.closing:
            return
        buffered = transport.get_write_buffer_size()
        if buffered < self._stall_buffered:
            self._stall_buffered = buffered  # it reads, however slowly
            self._stall_timer = self._loop.call_later(SEND_STALL_SECONDS, self._stall_check)
            return
        self._server.log.warning("closed a connection whose client stopped reading", client=self.remote)
        self.abort()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        if not self.closing:
            self._next()  # a waiting request starts once the client reads again

    def eof_received(self) -> bool | None:
        # The client closed its side: asyncio closes the transport (False), and connection_lost
        # stops any handler, so the upstream request ends with it. Clients of this port do not
        # half-close and then wait for an answer.
        return False

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            return  # dropped: reading stays on so that the client's FIN or reset is seen
        if self._idle:
            # The first byte of a new head after an idle keep-alive: the head deadline starts now.
            # Only then: bytes that begin no message (llhttp skips stray CRLFs) must not keep
            # pushing the deadline back.
            self._arm(self._server.head_timeout)
        if self._queue or self._held:
            # A request is waiting for its turn: what follows it is parsed only then (RFC 9112
            # 9.3.2: answers go out in order), held raw and bounded meanwhile.
            self._held += data
            self.update_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self._parsing is None:
            # Bytes outside any body belong to a head (or to stray CRLFs before one): counted here
            # as well as field by field, because llhttp holds a field's bytes until it is complete.
            self._head_bytes += len(data)
        else:
            self._since_body += len(data)
        self._read_spent = 0
        self._head_from = -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (or CONNECT) head is complete; what follows is not HTTP and is never read.
            self._input_closed = True
            if self._parsing is not None:
                self._parsing._done()
                self._parsing = None
            for request in self._queue:
                request._close = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, _Refusal) else 400)
            return
        except httptools.HttpParserError:
            self._refuse(400)
            return
        if self._in_head and self._head_from >= 0:
            # This head began inside this read, after an earlier message ended: the rest of the
            # read is its (an over-estimate by that message's framing bytes, never an under-one).
            self._head_bytes = len(data) - self._head_from
        if self._in_head and self._head_bytes > MAX_HEAD:
            self._refuse(431)
            return
        if self._parsing is not None and self._since_body > MAX_HEAD:
            # Chunk extensions or trailer fields without end (llhttp buffers a trailer field whole).
            self._refuse(431)
            return
        self._next()

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._read_spent:
            self._head_from = self._read_spent
        self._in_head = True
        self._head_size = 0
        self._target = []
        self._target_len = 0
        self._fields = []
        self._seen.clear()
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._expect_other = False

    def on_url(self, part: bytes) -> None:
        self._target_len += len(part)
        if self._target_len > MAX_TARGET:
            raise _Refusal(414)  # RFC 9112 3: a target longer than the server parses
        self._head_size += len(part)
        self._target.append(part)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field (RFC 9112 7.1.2): llhttp reads them, nobody here forwards them.
            return
        size = len(name) + len(value)
        self._head_size += size + 4
        # RFC 9112 5 / RFC 9110 5.5: whitespace around a field value is not part of it. llhttp
        # drops the leading OWS only; the trailing OWS goes here, for every field, so that what
        # the sidecar checks (a session's owner, a key) is exactly what the upstream will read.
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")
        if size > MAX_FIELD or len(self._fields) >= MAX_FIELDS or self._head_size > MAX_HEAD:
            raise _Refusal(431)  # RFC 6585 5
        lower = name.lower()
        if lower in _SINGLETONS:
            if lower in self._seen:
                raise _Refusal(400)
            self._seen.add(lower)
            if lower == b"content-length":
                self._content_length = int(value)  # llhttp accepted it: digits only
        elif lower == b"transfer-encoding":
            codings = [coding.strip() for coding in value.lower().split(b",")]
            if codings[-1] != b"chunked":
                # RFC 9112 6.3 (4): a request whose final coding is not chunked cannot be framed.
                raise _Refusal(400)
            if len(codings) > 1:
                # Any coding before chunked would reach the upstream undeclared once chunked is
                # removed: RFC 9112 6.1, a transfer coding the server does not understand.
                raise _Refusal(501)
            self._chunked = True
        elif lower == b"expect":
            # RFC 9110 10.1.1: 100-continue is the only expectation; every Expect line counts.
            if value.strip().lower() == b"100-continue":
                self._expect_continue = True
            else:
                self._expect_other = True
        # utf-8 with surrogateescape (as aiohttp decodes them): the bytes re-encode unchanged.
        self._fields.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._read_spent += self._head_size + len(self._parser.get_method()) + 13  # request line, blank line
        self._head_bytes = 0
        self._since_body = 0
        parser = self._parser
        http_version = parser.get_http_version()
        if http_version == "1.1":
            version = (1, 1)
        elif http_version == "1.0":
            version = (1, 0)
        else:
            raise _Refusal(505)  # RFC 9110 15.6.6: only HTTP/1.x is served here
        if self._expect_other and version >= (1, 1):
            raise _Refusal(417)  # RFC 9110 10.1.1: an expectation the server cannot meet
        if len(self._queue) >= MAX_PIPELINED:
            raise _Refusal(400)  # more requests ahead of their answers than any client needs
        keep_alive = parser.should_keep_alive()
        if self._chunked and version < (1, 1):
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing; served,
            # then the connection closes.
            keep_alive = False
        target = b"".join(self._target).decode("utf-8", "surrogateescape")
        request = Request(self, parser.get_method().decode("ascii"), target, version, CIMultiDict(self._fields),
                          self._content_length, self._chunked, keep_alive,
                          self._expect_continue and version >= (1, 1))
        self._parsing = request
        self._queue.append(request)

    def on_body(self, data: bytes) -> None:
        self._since_body = 0
        self._read_spent += len(data)
        if self._parsing is not None:
            self._parsing._feed(data)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._done()
            self._parsing = None

    # -- requests in turn ------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next request if none is being handled and the client reads its answers."""
        if self._current is None and self._queue and not self.closing and not self.write_paused:
            request = self._current = self._queue.popleft()
            self._deadline.disarm()
            self._idle = False
            self._task = self._loop.create_task(self._run(request))
            if not self._queue and self._held and not self._input_closed:
                # Its turn has come: what arrived after it is parsed now (its own body, maybe more).
                held = bytes(self._held)
                self._held.clear()
                self._feed(held)
                return
        self.update_reading()

    async def _run(self, request: Request) -> None:
        try:
            await self._server.dispatch(request)
        except asyncio.CancelledError:
            self.close_gently()
        except Exception as exc:
            if isinstance(exc, ConnectionError):
                self.abort()
            else:
                self._server.log.error("request failed", error=repr(exc), method=request.method)
                if not request.started and not self.closing:
                    request.respond(500, reason_phrase(500), _JSON, error_body(500), close=True)
                else:
                    self.close_now()
        finally:
            self._task = None
            self._current = None
            self._finished(request)

    def _finished(self, request: Request) -> None:
        if self.closing:
            return
        if not request._finished:
            self.close_now()  # a streamed answer that did not end: the client sees it cut short
            return
        if (request._close or not request.keep_alive or not request._complete or request._error is not None
                or self.closing_after):
            # RFC 9112 9.6: after "close", or with an unread body left on the connection; nothing
            # more is answered on this connection, a refusal owed to a later request included.
            self._close_after_writes()
            return
        if self._queue:
            self._next()
            return
        if self._refusal is not None:
            self._write_refusal(self._refusal)
            return
        if self._input_closed:
            self._close_after_writes()
            return
        if self._in_head:
            self._arm(self._server.head_timeout)
        else:
            self._arm(self._server.keepalive_timeout, idle=True)
        self.update_reading()

    def _refuse(self, status: int) -> None:
        """The request being read cannot be served: nothing of it (or behind it) is dispatched.
        Requests before it are still answered, in order; then it gets ``status`` and the
        connection closes."""
        self._input_closed = True
        self._in_head = False
        self._held.clear()
        parsing = self._parsing
        self._parsing = None
        if parsing is not None:
            if parsing is self._current:
                # The body of the request being handled broke its framing: its handler answers.
                parsing._fail(BodyError("malformed request body"))
                self.update_reading()
                return
            # A waiting request whose body broke: it is never dispatched.
            self._queue.remove(parsing)
        if self._current is None and not self._queue:
            self._write_refusal(status)
            return
        self._refusal = status
        self._next()

    def _write_refusal(self, status: int) -> None:
        self._server.log.warning("rejected a malformed request", client=self.remote, status=status)
        # A fixed body: nothing of the request is quoted back (it may carry a key; RFC 6750 5.3).
        body = error_body(status)
        self.write(f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: application/json\r\n"
                   f"Cache-Control: no-store\r\nDate: {http_date()}\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n".encode() + body)
        self._close_after_writes()

    # -- I/O helpers -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closing:
            transport.write(data)

    async def drain(self) -> None:
        if self.closing:
            raise ConnectionResetError("the client connection is closed")
        if self._drain is None:
            self._drain = self._loop.create_future()
        await asyncio.shield(self._drain)

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        parsing = self._parsing
        pause = self.write_paused or len(self._held) > MAX_HELD or (
            parsing is not None and parsing._buffered > BODY_HIGH_WATER)
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def close_gently(self) -> None:
        if not self.closing:
            self._close_after_writes()

    def _close_after_writes(self) -> None:
        """Close once the answer is out. Closing a socket with unread input makes the kernel send
        a reset, which can destroy the answer before the client reads it (RFC 9112 9.6: "close
        the connection in stages"): so send FIN once the answer is written, then read and discard
        what the client still sends until it closes too, for at most LINGER_SECONDS. A client
        that stops reading the answer for SEND_STALL_SECONDS is cut."""
        self._input_closed = True
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        self._deadline.cancel()
        try:
            if not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()  # asyncio sends the FIN after what is still buffered
        except OSError:
            transport.abort()  # the client is gone already
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._linger_since = self._loop.time()
        self._linger_buffered = transport.get_write_buffer_size()
        self._timer = self._loop.call_later(_LINGER_TICK, self._linger_check)

    def _linger_check(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        now = self._loop.time()
        buffered = transport.get_write_buffer_size()
        if buffered == 0:
            if self._linger_buffered:
                self._linger_buffered = 0
                self._linger_since = now  # all sent: the linger proper starts now
            elif now - self._linger_since >= LINGER_SECONDS:
                transport.abort()
                return
        elif buffered < self._linger_buffered:
            self._linger_buffered = buffered
            self._linger_since = now  # the client is reading, however slowly
        elif now - self._linger_since >= SEND_STALL_SECONDS:
            transport.abort()
            return
        self._timer = self._loop.call_later(_LINGER_TICK, self._linger_check)

    def close_now(self) -> None:
        """Close after what is already written, reading nothing more."""
        self._input_closed = True
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (a reset)."""
        self._input_closed = True
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        """For drain: close now if nothing is in progress, else after the current answer."""
        self.closing_after = True
        if self._current is None and not self._queue and not self.closing:
            self._close_after_writes()

    # -- the deadline ------------------------------------------------------------------------------

    def _arm(self, seconds: float, *, idle: bool = False) -> None:
        self._idle = idle
        self._deadline.arm(seconds)

    def _deadline_passed(self) -> None:
        if self.closing:
            return
        if self._current is None and not self._queue:
            # A head that did not complete in time (slowloris), or a kept-alive connection idle
            # for too long: closed without an answer, as there is no request to answer. An answer
            # the client has not read yet still gets its chance (bounded) to go out.
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size():
                self._close_after_writes()
            else:
                self.close_now()


_JSON = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))


class Listener:
    """The public port: accepts connections and runs ``dispatch`` for each request."""

    def __init__(self, dispatch: Dispatch, *, log: JsonLog, head_timeout: float, keepalive_timeout: float) -> None:
        self.dispatch = dispatch
        self.log = log
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[_Connection] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        self._server = await self.loop.create_server(lambda: _Connection(self), host, port,
                                                     reuse_address=True, backlog=backlog)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        """Drain, step one: no new connections; idle ones close now, busy ones after their answer."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            try:
                conn.close_if_idle()
            except Exception as exc:  # one connection's failure must not stop the drain of the rest
                self.log.warning("could not close a connection", error=repr(exc))
                conn.abort()

    async def close(self) -> None:
        """Drain, last step: cut whatever is still open and wait for its handlers to end."""
        self.stop_accepting()
        tasks = []
        for conn in list(self.connections):
            if conn._task is not None:
                tasks.append(conn._task)
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
