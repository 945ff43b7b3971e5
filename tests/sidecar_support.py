"""Shared test parts (used through the fixtures in ``conftest.py``): a running sidecar on free
ports, a recording aiohttp upstream, config files, raw HTTP and the CLI as a subprocess.

Everything here is real: TCP listeners on loopback, SQLite files under ``tmp_path``, the CLI
in another process. Nothing of the sidecar is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.keys.records import DISABLED, ENABLED, KeyRecord
from sidecar.logs import JsonLog
from sidecar.runtime.admin_runner import runner_for
from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.server import PublicServer
from sidecar.runtime.services import Services
from sidecar.settings import Settings, settings_from_mapping

ROLES: dict[str, dict[str, Any]] = {
    "viewer": {"description": "Read planning data", "permissions": ["plans:read"]},
    "org-admin": {"description": "Access organization settings, including API keys",
                  "permissions": ["org:settings"]},
    "writer": {"description": "Write planning data", "permissions": ["plans:write", "plans:read"]},
}


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Just enough TOML for config files: scalars, lists and nested tables."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, value in data.items():
        if isinstance(value, Mapping):
            table = f"{prefix}.{json.dumps(name)}" if prefix else json.dumps(name)
            out += f"\n[{table}]\n" + to_toml(value, table)
    return out


@dataclass
class ConfigFactory:
    """Settings for one test: a data dir under ``tmp_path``, cheap argon2, three roles."""

    tmp_path: Path

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "data"

    def mapping(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        base: dict[str, Any] = {
            "workspace": "acme",
            "data_dir": str(self.data_dir),
            # The fixture binds its own free ports; these only have to be valid and distinct.
            "proxy": {"listen": "127.0.0.1:0", "upstream": "http://127.0.0.1:9"},
            "admin": {"listen": "localhost:0"},
            "argon2": {"memory_cost_kib": 1024, "time_cost": 1},
            "roles": ROLES,
        }
        return deep_merge(base, overrides or {})

    def settings(self, overrides: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> Settings:
        return settings_from_mapping(self.mapping(overrides), environ or {}, base_dir=self.tmp_path)

    def write(self, overrides: Mapping[str, Any] | None = None, name: str = "config.toml",
              raw: Mapping[str, Any] | None = None) -> Path:
        """Write a TOML config file; ``raw`` replaces the whole document (for bad configs)."""
        path = self.tmp_path / name
        path.write_text(to_toml(raw if raw is not None else self.mapping(overrides)))
        return path


def bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("runner has no bound address")


@dataclass
class RunningSidecar:
    settings: Settings
    apps: SidecarApps
    proxy_url: str
    admin_url: str
    log_stream: io.StringIO

    @property
    def services(self) -> Services:
        return self.apps.services

    @property
    def proxy_port(self) -> int:
        return int(self.proxy_url.rsplit(":", 1)[1])

    async def create_key(self, name: str = "agent", roles: Sequence[str] = ("viewer",),
                         expires_at: str | None = None) -> tuple[KeyRecord, str]:
        """A new key through the running process (what the admin API does)."""
        return await self.services.keys.create(name=name, roles=list(roles), actor="test", client=None,
                                               expires_at=expires_at)

    async def disable(self, key_id: str) -> KeyRecord:
        return await self.services.keys.set_status(key_id, DISABLED, actor="test", client=None)

    async def enable(self, key_id: str) -> KeyRecord:
        return await self.services.keys.set_status(key_id, ENABLED, actor="test", client=None)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines() if line]


class SidecarStarter:
    """``await start(settings)``: both listeners on free loopback ports; stopped at teardown."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._public: list[PublicServer] = []

    async def __call__(self, settings: Settings) -> RunningSidecar:
        stream = io.StringIO()
        apps = create_app(settings, log=JsonLog(stream=stream, level="debug"))
        public = PublicServer(apps.proxy, settings)
        await public.start("127.0.0.1", 0)
        self._public.append(public)
        runner = runner_for(apps.admin, settings)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return RunningSidecar(settings, apps, f"http://127.0.0.1:{public.port}",
                              f"http://127.0.0.1:{bound_port(runner)}", stream)

    async def close(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()
        while self._public:
            await self._public.pop().close()


@dataclass
class SeenRequest:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: expected exactly one, got {values!r}"
        return values[0]


@dataclass
class EchoUpstream:
    """A plain aiohttp server standing in for the MCP server.

    * any path: answers JSON ``{"method", "path_qs", "headers": [[name, value]...], "body"}``
      after reading the whole body; ``?session=ID`` adds ``Mcp-Session-Id: ID`` to the answer,
      ``?status=N`` answers with status N, ``?hop`` adds hop-by-hop response fields;
    * ``/hang``: accepts and never answers; ``hang_started`` / ``hang_cancelled`` tell when the
      handler began and when it was cancelled (its client went away);
    * ``/sse?events=N&interval=S``: N server-sent events, S seconds apart;
    * ``/sse-forever``: one event every 50 ms until the client goes away (``sse_closed``).
    """

    url: str = ""
    requests: list[SeenRequest] = field(default_factory=list)
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    sse_closed: asyncio.Event = field(default_factory=asyncio.Event)
    sse_started: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [r.path_qs for r in self.requests]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = SeenRequest(request.method, request.raw_path, list(request.headers.items()))
        self.requests.append(seen)
        if request.path == "/hang":
            self.hang_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.hang_cancelled.set()
                raise
        if request.path.startswith("/sse"):
            return await self._sse(request)
        chunks = []
        async for chunk in request.content.iter_any():
            chunks.append(chunk)
            seen.body += chunk
        seen.complete = True
        headers = {}
        if "hop" in request.query:
            # A hop-by-hop field of the upstream's own, declared in its Connection header.
            headers.update({"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "upstream only",
                            "Keep-Alive": "timeout=5", "X-End-To-End": "kept"})
        if "session" in request.query:
            headers["Mcp-Session-Id"] = request.query["session"]
        payload = {"method": seen.method, "path_qs": seen.path_qs, "headers": seen.headers,
                   "body": b"".join(chunks).decode("utf-8", "replace")}
        return web.json_response(payload, headers=headers, status=int(request.query.get("status", "200")))

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.sse_started.set()
        forever = request.path == "/sse-forever"
        count = int(request.query.get("events", "3"))
        interval = float(request.query.get("interval", "0.05"))
        index = 0
        try:
            while forever or index < count:
                await resp.write(f"id: {index}\ndata: event {index}\n\n".encode())
                index += 1
                await asyncio.sleep(interval)
        except (asyncio.CancelledError, ConnectionResetError):
            self.sse_closed.set()
            raise
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def run_echo_upstream() -> AsyncIterator[EchoUpstream]:
    echo = EchoUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo.handle)
    # handler_cancellation: a handler sees CancelledError when its client (the proxy) goes away.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    echo.url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        yield echo
    finally:
        await runner.cleanup()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, method: str, path: str, headers: Sequence[tuple[str, str]],
                      body: bytes = b"", wait: float = 10.0) -> RawResponse:
    """One HTTP/1.1 exchange over a plain socket, headers sent exactly as given (names, case,
    duplicates, underscores); the response body is read by its Content-Length or chunks."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/1.1\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await _read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")[:-2]
    status = int(lines[0].split(" ")[1])
    parsed = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    values = {k.lower(): v for k, v in parsed}
    if values.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    elif "content-length" in values:
        body = await reader.readexactly(int(values["content-length"]))
    else:
        body = await reader.read()
    return RawResponse(status, parsed, body)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_cli(*args: str, program: str | None = None, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> CliResult:
    """``python -m sidecar ARGS`` (or ``program ARGS``) in another process."""
    command = [program] if program is not None else [sys.executable, "-m", "sidecar"]
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(env) if env is not None else None, cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client_session() -> aiohttp.ClientSession:
    """A client for talking to the sidecar: no env proxies, no cookie jar, no pooling surprises."""
    return aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=30))
