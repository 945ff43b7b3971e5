"""The upstreams a sidecar is tested against: ONE recording upstream, plus the example MCP server.

:class:`RecordingUpstream` is a raw asyncio TCP server on a loopback port that keeps every byte
it receives, per connection, and every request whose head arrived (:class:`SeenRequest`, its
body growing as it arrives), so a test can prove that nothing, or exactly what, was forwarded.
What it answers is a *behaviour* per connection, a coroutine given the connection:

* :func:`echo` (the ``echo`` fixture): a small MCP-server stand-in that answers JSON describing
  the request, streams server-sent events, or hangs (see its docstring);
* :func:`answer_ok`, :func:`stay_silent`, :func:`sse_then_reset`, or a test's own script over
  :class:`UpstreamConnection` (read requests, write exact bytes, drain, close, reset).

Reading is flow-controlled (the kernel holds what the behaviour has not read yet), and
``receive_buffer`` shrinks the accepted sockets' receive buffers so a test can see back-pressure.

:func:`example_upstream` runs the bundled example MCP server (official SDK) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

from mcp.server import MCPServer

from demo.server import ExampleServerHandle
from tests.support.raw import LOOPBACK, parse_fields


@dataclass
class SeenRequest:
    """One request as the upstream received it; ``body`` grows as it arrives (de-chunked),
    ``framed_body`` is the same bytes as framed on the wire, ``complete`` once it all came."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytearray = field(default_factory=bytearray)
    framed_body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def target(self) -> str:
        return self.path_qs

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: expected exactly one, got {values!r}"
        return values[0]


@dataclass(eq=False)
class UpstreamConnection:
    """One accepted connection: its reader and transport, every byte and request it received."""

    upstream: RecordingUpstream
    index: int  # in accept order, from 0
    reader: asyncio.StreamReader
    transport: asyncio.Transport
    received: bytearray = field(default_factory=bytearray)
    requests: list[SeenRequest] = field(default_factory=list)
    # Set when the client (the sidecar) closed its end or reset the connection.
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0  # free for a behaviour to count what it wrote
    _writable: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._writable.set()

    @property
    def completed(self) -> list[tuple[bytes, bytes]]:
        """Every request read to its end: (head, de-chunked body)."""
        return [(r.head, bytes(r.body)) for r in self.requests if r.complete]

    async def read_head(self) -> SeenRequest:
        """The next request head; recorded (here and on the upstream) before any body arrives."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, target = [*line.decode("latin-1").split(" "), "", ""][:2]
        headers = [(k.strip(), v.strip()) for k, _, v in (
            raw.decode("utf-8", "surrogateescape").partition(":") for raw in rest.split(b"\r\n") if raw)]
        seen = SeenRequest(method, target, headers, head)
        self.requests.append(seen)
        self.upstream.requests.append(seen)
        return seen

    async def read_body(self, seen: SeenRequest) -> bytes:
        """The body of ``seen`` (Content-Length or chunked), recorded as it arrives."""
        fields = parse_fields(seen.head)
        if "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                seen.framed_body += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        seen.framed_body += trailer
                    seen.framed_body += trailer
                    break
                await self._read_into(seen, size)
                seen.framed_body += await self.reader.readexactly(2)
        else:
            await self._read_into(seen, int(fields.get("content-length", ["0"])[0]))
        seen.complete = True
        return bytes(seen.body)

    async def _read_into(self, seen: SeenRequest, size: int) -> None:
        while size:
            chunk = await self.reader.read(min(size, 65536))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", size)
            seen.body += chunk
            seen.framed_body += chunk
            size -= len(chunk)

    async def read_request(self) -> SeenRequest:
        """The next whole request (head, then body)."""
        seen = await self.read_head()
        await self.read_body(seen)
        return seen

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        await self._writable.wait()
        if self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")

    async def until_client_closes(self) -> None:
        """Read (and drop) whatever comes until the client closes its end."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.client_closed.set()

    def close(self) -> None:
        self.transport.close()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), not a FIN."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


Behaviour = Callable[[UpstreamConnection], Awaitable[None]]


class _RecordingProtocol(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream) -> None:
        self._upstream = upstream
        self._conn: UpstreamConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        reader = asyncio.StreamReader()
        reader.set_transport(transport)  # flow control: reading pauses while the buffer is full
        self._conn = UpstreamConnection(self._upstream, len(self._upstream.connections), reader, transport)
        self._upstream.connections.append(self._conn)
        self._upstream.spawn(self._conn)

    def data_received(self, data: bytes) -> None:
        assert self._conn is not None
        self._conn.received.extend(data)
        self._conn.reader.feed_data(data)

    def eof_received(self) -> bool | None:
        assert self._conn is not None
        self._conn.reader.feed_eof()
        self._conn.client_closed.set()
        return False

    def pause_writing(self) -> None:
        assert self._conn is not None
        self._conn._writable.clear()

    def resume_writing(self) -> None:
        assert self._conn is not None
        self._conn._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            if exc is not None:
                self._conn.client_closed.set()  # reset by the client
            self._conn.reader.feed_eof()
            self._conn._writable.set()


class RecordingUpstream:
    """A raw TCP "MCP server" that records every byte and request it receives, on loopback."""

    def __init__(self, behaviour: Behaviour | None = None, *, receive_buffer: int | None = None) -> None:
        self.behaviour: Behaviour = behaviour or answer_ok()
        self.receive_buffer = receive_buffer
        self.connections: list[UpstreamConnection] = []
        # Every request whose head arrived, on any connection, in arrival order.
        self.requests: list[SeenRequest] = []
        # Moments of the echo behaviour's /hang and /sse paths.
        self.hang_started = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.sse_started = asyncio.Event()
        self.sse_closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.connections)

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.received) for c in self.connections)

    @property
    def completed(self) -> list[tuple[bytes, bytes]]:
        """Every request read to its end: (head, body), connection by connection."""
        return [request for conn in self.connections for request in conn.completed]

    def paths(self) -> list[str]:
        return [r.path_qs for r in self.requests]

    def targets(self) -> list[tuple[int, str]]:
        """(connection index, target) of every request read to its end, per connection in order."""
        return [(conn.index, r.target) for conn in self.connections for r in conn.requests if r.complete]

    def request_heads(self) -> list[bytes]:
        """Every request head received (request line + fields), in arrival order per connection."""
        heads: list[bytes] = []
        for conn in self.connections:
            heads.extend(_request_heads(bytes(conn.received)))
        return heads

    def spawn(self, conn: UpstreamConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: UpstreamConnection) -> None:
        try:
            await self.behaviour(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            conn.client_closed.set()  # the connection ends; what arrived is in conn for the test to judge
        finally:
            conn.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.receive_buffer is not None:
                # Inherited by accepted sockets: what the behaviour has not read waits on the
                # sender's side, not in this kernel.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.bind((LOOPBACK, 0))
        except BaseException:
            sock.close()
            raise
        self._server = await loop.create_server(lambda: _RecordingProtocol(self), sock=sock)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)


@asynccontextmanager
async def recording_upstream(behaviour: Behaviour | None = None, *,
                             receive_buffer: int | None = None) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream(behaviour, receive_buffer=receive_buffer)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def _request_heads(data: bytes) -> list[bytes]:
    # Request heads start a line with a method token and end at the first blank line; bodies in
    # these tests never contain "HTTP/1.1\r\n" so a scan is exact enough.
    return [m.group(0) for m in re.finditer(rb"[A-Z]+ [^\r\n]* HTTP/1\.[01]\r\n(?:[^\r\n]+\r\n)*\r\n", data)]


# ---------------------------------------------------------------------------------------------
# Behaviours


def ok_response(body: bytes = b'{"ok":true}', headers: Iterable[tuple[str, str]] = (),
                status: str = "200 OK") -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def answer_ok(headers: Callable[[bytes], Iterable[tuple[str, str]]] | None = None,
              delay: float = 0.0) -> Behaviour:
    """Answer every request on the connection with 200 JSON (keep-alive), optionally late."""

    async def behaviour(conn: UpstreamConnection) -> None:
        while True:
            try:
                seen = await conn.read_request()
            except (asyncio.IncompleteReadError, ValueError):
                return
            if delay:
                await asyncio.sleep(delay)
            conn.write(ok_response(headers=headers(seen.head) if headers else ()))

    return behaviour


async def stay_silent(conn: UpstreamConnection) -> None:
    """Accept and read, never answer."""
    while await conn.reader.read(65536):
        pass
    await asyncio.sleep(3600)


def sse_then_reset(events: Sequence[bytes], *, pause: float = 0.1) -> Behaviour:
    """Answer with a chunked SSE stream, write ``events``, then reset the connection (RST)."""

    async def behaviour(conn: UpstreamConnection) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        for event in events:
            conn.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await asyncio.sleep(0.02)
        await asyncio.sleep(pause)
        conn.reset()

    return behaviour


async def echo(conn: UpstreamConnection) -> None:
    """A stand-in for the MCP server, request after request on the connection (keep-alive):

    * any path: answers JSON ``{"method", "path_qs", "headers": [[name, value]...], "body"}``
      after reading the whole body; ``?session=ID`` adds ``Mcp-Session-Id: ID`` to the answer,
      ``?status=N`` answers with status N, ``?hop`` adds hop-by-hop response fields;
    * ``/hang``: never answers; the upstream's ``hang_started`` / ``hang_cancelled`` tell when
      the request arrived and when its client (the sidecar) went away;
    * ``/sse?events=N&interval=S``: N server-sent events (``id: i`` / ``data: event i``), S
      seconds apart (default 3, 0.05 s);
    * ``/sse-forever``: one event every 50 ms until the client goes away (``sse_closed``).
    """
    upstream = conn.upstream
    while True:
        try:
            seen = await conn.read_head()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        # Like a web framework: the body is taken in as it comes, whatever the handler does.
        body = asyncio.ensure_future(conn.read_body(seen))
        try:
            path, _, query_text = seen.path_qs.partition("?")
            query = dict(parse_qsl(query_text, keep_blank_values=True))
            if path == "/hang":
                upstream.hang_started.set()
                await conn.client_closed.wait()
                upstream.hang_cancelled.set()
                return
            if path.startswith("/sse"):
                if not await _sse(conn, forever=path == "/sse-forever", count=int(query.get("events", "3")),
                                  interval=float(query.get("interval", "0.05"))):
                    return
                await body
            else:
                await body
                headers = [("Content-Type", "application/json; charset=utf-8")]
                if "hop" in query:
                    # A hop-by-hop field of the upstream's own, declared in its Connection header.
                    headers += [("Connection", "X-Upstream-Hop"), ("X-Upstream-Hop", "upstream only"),
                                ("Keep-Alive", "timeout=5"), ("X-End-To-End", "kept")]
                if "session" in query:
                    headers.append(("Mcp-Session-Id", query["session"]))
                payload = json.dumps({"method": seen.method, "path_qs": seen.path_qs,
                                      "headers": [list(h) for h in seen.headers],
                                      "body": bytes(seen.body).decode("utf-8", "replace")}).encode()
                status = int(query.get("status", "200"))
                conn.write(_response_head(status, headers, len(payload))
                           + (b"" if seen.method == "HEAD" else payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if not body.done():
                body.cancel()
        if any(v.lower() == "close" for v in seen.all("Connection")) or seen.line.endswith(b"HTTP/1.0"):
            return


def _response_head(status: int, headers: Sequence[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _sse(conn: UpstreamConnection, *, forever: bool, count: int, interval: float) -> bool:
    """Stream events as one chunked response; False when the client went away first."""
    upstream = conn.upstream
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    upstream.sse_started.set()
    index = 0
    while forever or index < count:
        if conn.client_closed.is_set() or conn.transport.is_closing():
            upstream.sse_closed.set()
            return False
        event = f"id: {index}\ndata: event {index}\n\n".encode()
        conn.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        index += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.client_closed.wait(), interval)
    conn.write(b"0\r\n\r\n")
    return True


@asynccontextmanager
async def run_echo_upstream() -> AsyncIterator[RecordingUpstream]:
    async with recording_upstream(echo) as upstream:
        yield upstream


# ---------------------------------------------------------------------------------------------
# The example MCP server


@asynccontextmanager
async def example_upstream(stateless: bool = False, *, server: MCPServer | None = None,
                           json_response: bool = False) -> AsyncIterator[str]:
    """Run the example MCP server (or ``server``, an official-SDK server of the test's own) on a
    free loopback port, answering with events or (``json_response``) plain JSON; yield its base
    URL (no path)."""
    handle = ExampleServerHandle(LOOPBACK, 0, stateless=stateless, server=server, json_response=json_response)
    await handle.start()
    try:
        yield handle.base_url
    finally:
        await handle.stop()
