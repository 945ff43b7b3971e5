"""Helpers for the hardening tests: settings, a running sidecar, a recording upstream, raw HTTP.

* :func:`hardening_settings` builds validated :class:`Settings` for a test (cheap argon2 unless
  asked otherwise, small grace periods, the ``viewer`` and ``org-admin`` roles).
* :func:`running_sidecar` starts the proxy app and then the admin app on loopback port 0, the
  way ``serve`` does (``PublicServer``, ``runner_for`` + ``TCPSite``), and yields a :class:`Sidecar`.
* :class:`RecordingUpstream` is a raw asyncio TCP server that records every byte it receives,
  per connection, so a test can prove that nothing (or exactly what) was forwarded. Its
  behaviour per connection is a coroutine (:func:`answer_ok`, :func:`stay_silent`, ...).
* :func:`exchange` speaks raw bytes to a listener; :func:`parse_responses` reads the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.keys.format import ALPHABET, LOOKUP_LEN, PREFIX, SECRET_LEN, checksum
from sidecar.keys.records import KeyRecord
from sidecar.logs import JsonLog
from sidecar.proxy.headers import IDENTITY_HEADERS
from sidecar.runtime.admin_runner import runner_for
from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.server import PublicServer
from sidecar.runtime.services import Services
from sidecar.settings import Settings, settings_from_mapping

LOOPBACK = "127.0.0.1"
IDENTITY_NAMES_LOWER = tuple(name.lower() for name in IDENTITY_HEADERS)
FORWARDING_NAMES_LOWER = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")

# ---------------------------------------------------------------------------------------------
# Settings


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), dict):
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


def hardening_settings(data_dir: Path, upstream: str, *, cheap_argon2: bool = True,
                       **sections: Mapping[str, Any]) -> Settings:
    """Settings for one test; ``sections`` override tables, e.g. ``proxy={"max_body_bytes": 10}``."""
    document: dict[str, Any] = {
        "workspace": "acme",
        "data_dir": str(data_dir),
        "log_level": "warning",
        "shutdown_grace_seconds": 1,
        "proxy": {"listen": f"{LOOPBACK}:0", "upstream": upstream, "upstream_timeout_seconds": 5},
        # The admin listen value is not used here (tests bind port 0 themselves) but must differ.
        "admin": {"listen": f"{LOOPBACK}:1"},
        "auth": {"last_used_flush_seconds": 60},
        "roles": {
            "viewer": {"description": "Read planning data", "permissions": ["plans:read"]},
            "org-admin": {"description": "Access organization settings", "permissions": ["org:settings"]},
        },
    }
    if cheap_argon2:
        document["argon2"] = {"memory_cost_kib": 1024, "time_cost": 1}
    return settings_from_mapping(_merge(document, sections), {})


# ---------------------------------------------------------------------------------------------
# The sidecar under test


@dataclass
class Sidecar:
    apps: SidecarApps
    settings: Settings
    port: int
    admin_port: int
    log: io.StringIO

    @property
    def services(self) -> Services:
        return self.apps.services

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    async def create_key(self, name: str, roles: Sequence[str] = ("viewer",)) -> tuple[KeyRecord, str]:
        """A real key through the same path the admin API uses; returns the record and the key."""
        return await self.services.keys.create(name=name, roles=list(roles), actor="test", client=None)


async def _start_site(app: web.Application, settings: Settings) -> tuple[web.BaseRunner, int]:
    runner = runner_for(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    address = runner.addresses[0]
    return runner, int(address[1])


@asynccontextmanager
async def running_sidecar(settings: Settings) -> AsyncIterator[Sidecar]:
    """The proxy app then the admin app, each on a loopback port chosen by the kernel."""
    # The sidecar's JSON lines go to a buffer a test can read, not to the test output.
    stream = io.StringIO()
    apps = create_app(settings, log=JsonLog(stream=stream, level="info"))
    public = PublicServer(apps.proxy, settings)
    await public.start(LOOPBACK, 0)
    runners: list[web.BaseRunner] = []
    try:
        admin_runner, admin_port = await _start_site(apps.admin, settings)
        runners.append(admin_runner)
        yield Sidecar(apps=apps, settings=settings, port=public.port, admin_port=admin_port, log=stream)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await public.close()


# ---------------------------------------------------------------------------------------------
# Keys


def checksum_valid_token(lookup_id: str, secret: str | None = None) -> str:
    """A token with the right shape and checksum (so it reaches the store), usually wrong."""
    body_secret = secret if secret is not None else "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LEN))
    assert len(lookup_id) == LOOKUP_LEN
    assert len(body_secret) == SECRET_LEN
    return f"{PREFIX}{lookup_id}{body_secret}{checksum(lookup_id, body_secret)}"


# ---------------------------------------------------------------------------------------------
# The recording upstream


@dataclass
class UpstreamConnection:
    """One accepted connection: its reader, its transport and everything it received."""

    reader: asyncio.StreamReader
    transport: asyncio.Transport
    received: bytearray = field(default_factory=bytearray)
    # Requests read to their end (head, de-chunked body) by the behaviour.
    completed: list[tuple[bytes, bytes]] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

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
        self._conn = UpstreamConnection(reader=asyncio.StreamReader(), transport=transport)
        self._upstream.connections.append(self._conn)
        self._upstream.spawn(self._conn)

    def data_received(self, data: bytes) -> None:
        assert self._conn is not None
        self._conn.received.extend(data)
        self._conn.reader.feed_data(data)

    def eof_received(self) -> bool | None:
        assert self._conn is not None
        self._conn.reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._conn.reader.feed_eof()


class RecordingUpstream:
    """A raw TCP "MCP server" that logs every byte it receives, on loopback port 0."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour: Behaviour = behaviour or answer_ok()
        self.connections: list[UpstreamConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.received) for c in self.connections)

    @property
    def completed(self) -> list[tuple[bytes, bytes]]:
        """Every request the upstream read to its end: (head, body)."""
        return [request for conn in self.connections for request in conn.completed]

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
            pass  # the connection ends; what arrived is in conn.received for the test to judge
        finally:
            conn.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RecordingProtocol(self), LOOPBACK, 0)
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
async def recording_upstream(behaviour: Behaviour | None = None) -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream(behaviour)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def _request_heads(data: bytes) -> list[bytes]:
    # Request heads start a line with a method token and end at the first blank line; bodies in
    # these tests never contain "HTTP/1.1\r\n" so a scan is exact enough.
    return [m.group(0) for m in re.finditer(rb"[A-Z]+ [^\r\n]* HTTP/1\.[01]\r\n(?:[^\r\n]+\r\n)*\r\n", data)]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request from ``reader``: (head, body), body de-chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = parse_fields(head)
    if "chunked" in fields.get("transfer-encoding", [""])[-1].lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return head, bytes(body)
            body.extend(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(fields.get("content-length", ["0"])[0])
    return head, (await reader.readexactly(length)) if length else b""


def parse_fields(head: bytes) -> dict[str, list[str]]:
    """Field lines of a message head, by lower-case name, in order (request/status line skipped)."""
    fields: dict[str, list[str]] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        fields.setdefault(name.decode("latin-1").strip().lower(), []).append(value.decode("latin-1").strip())
    return fields


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
                head, body = await read_request(conn.reader)
            except (asyncio.IncompleteReadError, ValueError):
                return
            conn.completed.append((head, body))
            if delay:
                await asyncio.sleep(delay)
            conn.write(ok_response(headers=headers(head) if headers else ()))

    return behaviour


async def stay_silent(conn: UpstreamConnection) -> None:
    """Accept and read, never answer."""
    while await conn.reader.read(65536):
        pass
    await asyncio.sleep(3600)


def sse_then_reset(events: Sequence[bytes], *, pause: float = 0.1) -> Behaviour:
    """Answer with a chunked SSE stream, write ``events``, then reset the connection (RST)."""

    async def behaviour(conn: UpstreamConnection) -> None:
        await read_request(conn.reader)
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        for event in events:
            conn.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await asyncio.sleep(0.02)
        await asyncio.sleep(pause)
        conn.reset()

    return behaviour


# ---------------------------------------------------------------------------------------------
# Raw HTTP over sockets


def http_request(method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                 *, host: str = "sidecar.test", close: bool = True) -> bytes:
    """A well-formed HTTP/1.1 request as bytes (Content-Length added when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(port: int, data: bytes | Sequence[bytes], *, gap: float = 0.0,
                   wait: float = 3.0, until_closed: bool = True) -> bytes:
    """Send ``data`` (or each piece, ``gap`` seconds apart) and return all bytes read until the
    server closes (or ``wait`` seconds pass; with ``until_closed=False``, until it goes quiet)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    pieces = [data] if isinstance(data, bytes) else list(data)
    received = bytearray()
    try:
        for index, piece in enumerate(pieces):
            if index and gap:
                await asyncio.sleep(gap)
            with contextlib.suppress(ConnectionError):
                writer.write(piece)
                await writer.drain()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left if until_closed else min(left, 0.3))
            except TimeoutError:
                break
            except ConnectionError:
                break
            if not chunk:
                break
            received.extend(chunk)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1)
    return bytes(received)


@dataclass
class RawResponse:
    status: int
    fields: dict[str, list[str]]
    body: bytes
    complete: bool
    head: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every HTTP/1.1 response in ``data``; the last may be incomplete (``complete=False``)."""
    responses: list[RawResponse] = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0 or not rest.startswith(b"HTTP/1."):
            break
        head, rest = rest[:end + 4], rest[end + 4:]
        status = int(head.split(b" ", 2)[1])
        fields = parse_fields(head)
        if status < 200 or status in (204, 304):
            body, complete = b"", True  # RFC 9112 6.3: never a body (100 Continue is interim)
        elif "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
            body, rest, complete = _dechunk(rest)
        elif "content-length" in fields:
            length = int(fields["content-length"][0])
            body, rest = rest[:length], rest[length:]
            complete = len(body) == length
        else:
            body, rest, complete = rest, b"", True
        responses.append(RawResponse(status, fields, body, complete, head))
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    body = bytearray()
    rest = data
    while True:
        line_end = rest.find(b"\r\n")
        if line_end < 0:
            return bytes(body), b"", False
        size = int(rest[:line_end].split(b";")[0], 16)
        rest = rest[line_end + 2:]
        if size == 0:
            if not rest.startswith(b"\r\n"):
                return bytes(body), b"", False
            return bytes(body), rest[2:], True
        if len(rest) < size + 2:
            body.extend(rest[:size])
            return bytes(body), b"", False
        body.extend(rest[:size])
        rest = rest[size + 2:]


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the peer closes the connection (EOF or reset) within ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return False


async def wait_for_condition(check: Callable[[], bool], within: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(interval)
    return check()


def assert_no_secrets(body: bytes, *secrets_: str) -> None:
    """An error body never carries identity header names, identity values or a key."""
    text = body.decode("latin-1").lower()
    for name in IDENTITY_NAMES_LOWER:
        assert name not in text, f"{name} leaked in {body!r}"
    for value in secrets_:
        if value:
            assert value.lower() not in text, f"secret value leaked in {body!r}"
    assert re.search(r"tak_[0-9a-z]{46}", text) is None, f"a key leaked in {body!r}"


# ---------------------------------------------------------------------------------------------
# An attacker in its own process (so its client-side work is not billed to the sidecar's loop)

ATTACK_SCRIPT = r'''
import http.client, json, sys, threading, time
host, port, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokens = json.loads(sys.stdin.readline())
statuses, lock = [], threading.Lock()

def worker(mine):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for token in mine:
        conn.request("GET", "/mcp", headers={"Authorization": "Bearer " + token})
        response = conn.getresponse()
        response.read()
        with lock:
            statuses.append(response.status)
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)

threads = [threading.Thread(target=worker, args=(tokens[n::concurrency],)) for n in range(concurrency)]
print("started", flush=True)
started = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(60)
print(json.dumps({"statuses": statuses, "seconds": time.perf_counter() - started}), flush=True)
'''


class Attacker:
    """Sends each token once over ``concurrency`` keep-alive connections from another process;
    reports every status and the attack's wall time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls, port: int, tokens: Sequence[str], concurrency: int = 4) -> Attacker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACK_SCRIPT, LOOPBACK, str(port), str(concurrency),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps(list(tokens)).encode() + b"\n")
        await process.stdin.drain()
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"started\n"
        return cls(process)

    async def result(self) -> tuple[list[int], float]:
        try:
            out, _ = await asyncio.wait_for(self._process.communicate(), 60)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
            raise
        report = json.loads(out)
        return list(report["statuses"]), float(report["seconds"])
