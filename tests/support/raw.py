"""The one raw HTTP/1.1 client: requests as exact bytes over a plain socket, responses parsed
from the bytes that came back (framing, completeness and all).

* :func:`http_request` builds a request (``Host`` and ``Connection: close`` unless told not to);
* :func:`exchange` sends bytes (or pieces, with gaps) and returns everything read back;
* :func:`raw_request` sends one request with header fields exactly as given and returns the
  first response as soon as it is complete;
* :func:`parse_responses` / :class:`RawResponse` read answers; :func:`parse_fields` and
  :func:`read_request` read message heads and requests (the upstream side uses them too);
* :func:`closed_within` tells whether the peer closed; :func:`free_port` / :func:`closed_port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback port that is free now (bound, then released) for a config file to name."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    return free_port()


def parse_fields(head: bytes) -> dict[str, list[str]]:
    """Field lines of a message head, by lower-case name, in order (request/status line skipped)."""
    fields: dict[str, list[str]] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        fields.setdefault(name.decode("latin-1").strip().lower(), []).append(value.decode("latin-1").strip())
    return fields


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


def http_request(method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                 *, host: str | None = "sidecar.test", close: bool = True) -> bytes:
    """A well-formed HTTP/1.1 request as bytes: the fields exactly as given (names, case,
    duplicates), ``Host`` unless ``host=None``, ``Content-Length`` when there is a body and
    ``Connection: close`` unless ``close=False``."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RawResponse:
    """One response as it came off the wire."""

    status: int
    fields: dict[str, list[str]]
    body: bytes
    complete: bool
    head: bytes
    # No Content-Length and not chunked: the body ends where the connection does.
    until_close: bool = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The field lines in order, names as sent."""
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]

    def header(self, name: str) -> str | None:
        values = self.fields.get(name.lower())
        return values[0] if values else None

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
        until_close = False
        if status < 200 or status in (204, 304):
            body, complete = b"", True  # RFC 9112 6.3: never a body (100 Continue is interim)
        elif "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
            body, rest, complete = _dechunk(rest)
        elif "content-length" in fields:
            length = int(fields["content-length"][0])
            body, rest = rest[:length], rest[length:]
            complete = len(body) == length
        else:
            body, rest, complete, until_close = rest, b"", True, True
        responses.append(RawResponse(status, fields, body, complete, head, until_close))
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


async def raw_request(port: int, method: str, path: str, headers: Sequence[tuple[str, str]],
                      body: bytes = b"", wait: float = 10.0) -> RawResponse:
    """One HTTP/1.1 exchange over a plain socket, header fields sent exactly as given (names,
    case, duplicates, underscores; no ``Host`` added); returns the first response once complete."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(http_request(method, path, headers, body, host=None, close=False))
        await writer.drain()
        received = bytearray()
        async with asyncio.timeout(wait):
            while True:
                chunk = await reader.read(65536)
                received.extend(chunk)
                responses = parse_responses(bytes(received))
                if responses and responses[0].complete and not (responses[0].until_close and chunk):
                    return responses[0]
                if not chunk:
                    raise ConnectionError(f"connection closed before a complete response: {bytes(received)[:200]!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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
