"""Running both listeners (the public one is ``sidecar.listener``, the admin one aiohttp with a
head deadline and JSON error pages), and the graceful drain on SIGTERM.

Drain order (SPEC 5 readiness, issue "graceful drain"): readiness turns 503 at once; after a
short delay (so the load balancer / kube-proxy stops sending new connections) the listeners
close; in-flight requests and SSE streams may finish for up to ``shutdown_grace_seconds``;
then the rest are cut, batched state is flushed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from sidecar.app import ProxyApp, SidecarApps, create_app
from sidecar.errors import json_response
from sidecar.listener import Listener
from sidecar.logs import JsonLog, install
from sidecar.settings import Settings


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler plus a request-head deadline (slowloris): a client that has
    not sent a complete request head within ``head_timeout`` seconds of its first byte (or of
    connecting) is disconnected. Idle keep-alive is bounded by aiohttp's keepalive_timeout."""

    head_timeout = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A deadline plus at most one lazily rescheduled timer (aiohttp's keep-alive pattern):
        # arming and disarming per request are attribute writes, not timer churn on the loop.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and not self._request_in_progress and not self._messages:
            self._arm()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._head_deadline = None
            current = self._current_request
            last = self._messages[-1][0] if self._messages else None
            if current is not None and isinstance(last, _ErrInfo) and not current.content.is_eof():
                # The body of the request being handled broke its framing (e.g. a bad chunk size,
                # RFC 9112 7.1). aiohttp queues a 400 for after the handler but leaves the handler
                # waiting for body bytes that will never come; fail its body now so the proxy
                # aborts the upstream request instead of holding it until the upstream timeout.
                current.content.set_exception(last.exc)
                current.content.feed_eof()  # and no lingering read of a body that cannot be framed

    def _arm(self) -> None:
        self._head_deadline = deadline = self._loop.time() + self.head_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(deadline, self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._head_timer = self._loop.call_at(deadline, self._head_check)
            return
        self._head_deadline = None
        if not self._request_in_progress and not self._messages:
            self.force_close()
            if self.transport is not None:
                self.transport.close()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        # aiohttp's own error page quotes the offending request line back to the client and into
        # the log, e.g. "Authorization : Bearer tak_..." for a bad field line, which would echo the
        # key (RFC 6750 5.3 / SPEC 3: keys are never echoed). Answer with a fixed JSON body and
        # log only the kind of error; unexpected handler failures (500) keep their traceback.
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.warning("Rejected a malformed request from %s (%s, %s)", request.remote, status,
                                type(exc).__name__ if exc is not None else "-")
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        code = "invalid_request" if status == 400 else phrase.lower().replace(" ", "_")
        resp = json_response(status, {"error": code, "error_description": phrase})
        resp.force_close()
        return resp


def _guarded_server(head_timeout: float) -> type[web.Server]:
    handler_class = type("HeadTimeoutRequestHandler", (GuardedRequestHandler,), {"head_timeout": head_timeout})

    class GuardedServer(web.Server):
        def __call__(self) -> RequestHandler:
            return handler_class(self, loop=self._loop, **self._kwargs)  # type: ignore[no-any-return]

    return GuardedServer


class SidecarRunner(web.AppRunner):
    """AppRunner whose connections get :class:`GuardedRequestHandler` (the admin listener)."""

    def __init__(self, app: web.Application, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _guarded_server(self._head_timeout)
        return server


def runner_for(app: web.Application, settings: Settings) -> SidecarRunner:
    """The admin listener's runner."""
    return SidecarRunner(
        app,
        head_timeout=settings.proxy.header_timeout_seconds,
        # A client that goes away cancels its handler (aiohttp's default lets it run on).
        handler_cancellation=True,
        access_log=None,  # we write our own JSON access lines
        keepalive_timeout=settings.proxy.keepalive_timeout_seconds,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )


class PublicServer:
    """The public listener (``sidecar.listener``) serving the proxy app; holds the shared
    services open while it runs."""

    def __init__(self, app: ProxyApp, settings: Settings) -> None:
        self.app = app
        self._settings = settings
        self._listener: Listener | None = None

    async def start(self, host: str, port: int) -> None:
        services = self.app.services
        await services.acquire()
        try:
            listener = Listener(self.app, log=services.log,
                                head_timeout=self._settings.proxy.header_timeout_seconds,
                                keepalive_timeout=self._settings.proxy.keepalive_timeout_seconds)
            await listener.start(host, port)
        except BaseException:
            await services.release()
            raise
        self._listener = listener

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.port

    def stop_accepting(self) -> None:
        if self._listener is not None:
            self._listener.stop_accepting()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close()
            finally:
                await self.app.services.release()


@dataclass
class Running:
    public: PublicServer
    admin: SidecarRunner


async def start(apps: SidecarApps, settings: Settings) -> Running:
    public = PublicServer(apps.proxy, settings)
    await public.start(settings.proxy.listen.host, settings.proxy.listen.port)
    try:
        admin = runner_for(apps.admin, settings)
        await admin.setup()
        await web.TCPSite(admin, settings.admin.listen.host, settings.admin.listen.port, reuse_address=True,
                          backlog=1024).start()
    except BaseException:
        await public.close()
        raise
    return Running(public, admin)


async def drain(apps: SidecarApps, running: Running, settings: Settings, pre_stop_delay: float = 1.0) -> None:
    services = apps.services
    services.draining = True
    services.log.info("draining", grace_seconds=settings.shutdown_grace_seconds)
    await asyncio.sleep(min(pre_stop_delay, settings.shutdown_grace_seconds))
    # Stop accepting new connections on the public listener; in-flight requests continue.
    running.public.stop_accepting()
    try:
        await asyncio.wait_for(services.streams.idle.wait(), timeout=settings.shutdown_grace_seconds)
    except TimeoutError:
        services.log.warning("grace period over; closing open streams", open=len(services.streams))
        services.streams.cut_all()
    await running.admin.cleanup()
    await running.public.close()


def _raise_fd_limit(log: JsonLog) -> None:
    """Every open stream holds two sockets (client and upstream); a soft RLIMIT_NOFILE of 1024,
    common by default, would cap the sidecar near 500 streams. Raise it to the hard limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", soft=soft, hard=hard, error=str(exc))


async def serve(settings: Settings, *, stop: asyncio.Event | None = None,
                started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and return."""
    log = JsonLog(level=settings.log_level)
    install(log)
    _raise_fd_limit(log)
    apps = create_app(settings, log=log)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(apps, settings)
    log.info("listening", proxy=str(settings.proxy.listen), admin=str(settings.admin.listen),
             upstream=settings.proxy.upstream, workspace=settings.workspace)
    log.flush()
    if started is not None:
        started.set()
    try:
        await stop.wait()
        await drain(apps, running, settings)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    log.flush()
