"""Running both listeners (the public one is ``sidecar.http.server``, the admin one aiohttp with a
head deadline and JSON error pages), and the graceful drain on SIGTERM.

Drain order (docs/reference/admin-api.md readiness, issue "graceful drain"): readiness turns 503 at once; after a
short delay (so the load balancer / kube-proxy stops sending new connections) the listeners
close; in-flight requests and SSE streams may finish for up to ``shutdown_grace_seconds``;
then the rest are cut, batched state is flushed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

from aiohttp import web

from sidecar.http.server import Listener
from sidecar.logs import JsonLog, install
from sidecar.runtime.admin_runner import SidecarRunner, runner_for
from sidecar.runtime.apps import SidecarApps, create_app
from sidecar.runtime.public_app import ProxyApp
from sidecar.settings import Settings


class PublicServer:
    """The public listener (``sidecar.http.server``) serving the proxy app; holds the shared
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
