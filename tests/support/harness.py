"""ONE way to run a sidecar in a test: :func:`running_sidecar`.

It builds the apps with ``create_app(settings)`` and starts them with ``sidecar.runtime.server.start``
(what ``toolio-sidecar serve`` runs: the public listener, then the admin listener) on the ports
the settings name, port 0 by default, and yields a :class:`RunningSidecar` that knows the ports
the kernel chose. The sidecar's JSON log lines go to a buffer the test can read.

The other entry points are thin and share it:

* :class:`SidecarStarter` (the ``start_sidecar`` fixture): ``await start_sidecar(settings)``,
  stopped at teardown;
* :func:`served_in_thread`: anything started on a private event loop in a daemon thread, for
  synchronous clients (hypothesis, ``requests``);
* ``tests.support.admin.admin_sidecar``: plus an admin key and an HTTP client for the admin API;
* a real ``toolio-sidecar serve`` process is ``tests.support.processes.serving``.

:func:`event_stream` holds a server-sent event stream open through a sidecar (either kind) and
tells when the sidecar ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp

from sidecar.keys.records import DISABLED, ENABLED, KeyRecord
from sidecar.logs import JsonLog
from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.server import PublicServer, Running, start
from sidecar.runtime.services import Services
from sidecar.settings import Settings
from tests.support.raw import LOOPBACK

T = TypeVar("T")


@dataclass
class RunningSidecar:
    """Both listeners of one sidecar, up; ``services`` is its composition root."""

    settings: Settings
    apps: SidecarApps
    running: Running
    log_stream: io.StringIO

    @property
    def services(self) -> Services:
        return self.apps.services

    @property
    def public(self) -> PublicServer:
        return self.running.public

    @property
    def proxy_port(self) -> int:
        return self.running.public.port

    @property
    def admin_port(self) -> int:
        return int(self.running.admin.addresses[0][1])

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        host = self.settings.admin.listen.host
        return f"http://{host}:{self.admin_port}"

    async def create_key(self, name: str = "agent", roles: Sequence[str] = ("viewer",),
                         expires_at: str | None = None) -> tuple[KeyRecord, str]:
        """A new key through the running process (what the admin API does): record and key."""
        return await self.services.keys.create(name=name, roles=list(roles), actor="test", client=None,
                                               expires_at=expires_at)

    async def disable(self, key_id: str) -> KeyRecord:
        return await self.services.keys.set_status(key_id, DISABLED, actor="test", client=None)

    async def enable(self, key_id: str) -> KeyRecord:
        return await self.services.keys.set_status(key_id, ENABLED, actor="test", client=None)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines() if line.strip()]


@asynccontextmanager
async def running_sidecar(settings: Settings) -> AsyncIterator[RunningSidecar]:
    """Start a sidecar as ``serve`` does, on the ports ``settings`` name (0: the kernel's choice)."""
    stream = io.StringIO()
    apps = create_app(settings, log=JsonLog(stream=stream, level="debug"))
    running = await start(apps, settings)
    try:
        yield RunningSidecar(settings, apps, running, stream)
    finally:
        try:
            await running.admin.cleanup()
        finally:
            await running.public.close()


class SidecarStarter:
    """``await start(settings)``: a :func:`running_sidecar`, stopped at teardown."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()

    async def __call__(self, settings: Settings) -> RunningSidecar:
        return await self._stack.enter_async_context(running_sidecar(settings))

    async def close(self) -> None:
        await self._stack.aclose()


@contextlib.contextmanager
def served_in_thread(setup: Callable[[AsyncExitStack], Awaitable[T]], *, name: str) -> Iterator[T]:
    """Run ``setup(stack)`` on a private event loop in a daemon thread and yield what it returns;
    the contexts it entered on ``stack`` stay open until the block ends."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            state["value"] = await setup(stack)
            state.update(loop=asyncio.get_running_loop(), stop=stop)
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # surfaced by the caller, not lost in the thread
            state["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    assert ready.wait(30), f"{name} did not start"
    if "error" in state:
        raise state["error"]
    try:
        yield state["value"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
    if "error" in state:
        raise state["error"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client_session() -> aiohttp.ClientSession:
    """A client for talking to the sidecar: no env proxies, no cookie jar, no pooling surprises."""
    return aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=30))


@dataclass
class EventStream:
    """An open event stream, read in the background until it ends."""

    response: aiohttp.ClientResponse
    events: int = 0
    ended_at: float | None = None  # time.monotonic()
    ended_wall: datetime | None = None  # the same moment on the wall clock (to compare with store times)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    async def _read(self) -> None:
        try:
            while chunk := await self.response.content.readany():
                self.events += chunk.count(b"\n\n")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            pass  # the sidecar closed the connection mid-stream: what a cut looks like
        self.ended_at, self.ended_wall = time.monotonic(), datetime.now(UTC)
        self._done.set()

    @property
    def open(self) -> bool:
        return not self._done.is_set()

    async def ended(self, within: float = 10.0) -> float:
        """Wait until the stream ends; its monotonic end time. Fails after ``within`` seconds."""
        try:
            await asyncio.wait_for(self._done.wait(), within)
        except TimeoutError:
            raise AssertionError(f"the stream was still open after {within} s ({self.events} events)") from None
        assert self.ended_at is not None
        return self.ended_at


@asynccontextmanager
async def event_stream(url: str, key: str) -> AsyncIterator[EventStream]:
    """GET ``url`` with ``key``; once the first event arrived, yield the stream being read."""
    async with (client_session() as http,
                http.get(url, headers={**bearer(key), "Accept": "text/event-stream"}) as resp):
        assert resp.status == 200, resp.status
        assert resp.content_type == "text/event-stream"
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        stream = EventStream(resp, events=1)
        reader = asyncio.create_task(stream._read())
        try:
            yield stream
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
