"""The admin listener's aiohttp runner with a request-head deadline and JSON error pages.

Every use of aiohttp's private names is fenced in this module, so an aiohttp upgrade that moves
them breaks one file, and its tests say so."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from multidict import CIMultiDict

from sidecar.errors import JSON_FIELDS
from sidecar.http.deadline import Deadline
from sidecar.http.wire import error_body
from sidecar.settings import Settings


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler plus a request-head deadline (slowloris): a client that has
    not sent a complete request head within ``head_timeout`` seconds of its first byte (or of
    connecting) is disconnected. Idle keep-alive is bounded by aiohttp's keepalive_timeout."""

    head_timeout = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Arming and disarming per request are attribute writes, not timer churn on the loop.
        self._head_deadline = Deadline(self._loop, self._head_late)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_deadline.arm(self.head_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._head_deadline.armed and not self._request_in_progress and not self._messages:
            self._head_deadline.arm(self.head_timeout)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._head_deadline.disarm()
            current = self._current_request
            last = self._messages[-1][0] if self._messages else None
            if current is not None and isinstance(last, _ErrInfo) and not current.content.is_eof():
                # The body of the request being handled broke its framing (e.g. a bad chunk size,
                # RFC 9112 7.1). aiohttp queues a 400 for after the handler but leaves the handler
                # waiting for body bytes that will never come; fail its body now so the proxy
                # aborts the upstream request instead of holding it until the upstream timeout.
                current.content.set_exception(last.exc)
                current.content.feed_eof()  # and no lingering read of a body that cannot be framed

    def _head_late(self) -> None:
        if not self._request_in_progress and not self._messages:
            self.force_close()
            if self.transport is not None:
                self.transport.close()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        # aiohttp's own error page quotes the offending request line back to the client and into
        # the log, e.g. "Authorization : Bearer tak_..." for a bad field line, which would echo the
        # key (RFC 6750 5.3 / docs/reference/headers.md: keys are never echoed). Answer with a fixed JSON body and
        # log only the kind of error; unexpected handler failures (500) keep their traceback.
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.logger.warning("Rejected a malformed request from %s (%s, %s)", request.remote, status,
                                type(exc).__name__ if exc is not None else "-")
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        resp = web.Response(status=status, body=error_body(status), headers=CIMultiDict(JSON_FIELDS))
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
