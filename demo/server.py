"""The bundled example MCP server (used by ``toolio-sidecar demo`` and by the tests); it needs
the ``[demo]`` extra (the official MCP SDK and uvicorn), which the plain package does not install.

A plain, unmodified MCP server built with the official Python SDK. It knows nothing about
the sidecar: it only reports, through the ``whoami`` tool, which identity headers reached it.

Served over Streamable HTTP at ``/mcp``. One app serves both transport eras at once:

* 2025-era sessions: ``initialize`` (``Mcp-Session-Id`` issued), the GET SSE stream and
  ``DELETE``; requests without ``MCP-Protocol-Version`` or with a handshake-era value;
* 2026-07-28 stateless requests: every POST carries ``MCP-Protocol-Version: 2026-07-28``
  (plus ``Mcp-Method`` / ``Mcp-Name``) and the SDK's session manager routes it to its
  single-exchange handler, whatever ``stateless`` says.

``stateless=True`` only changes the 2025 era (no session ids, no GET stream).

The SDK's DNS-rebinding protection stays on: only loopback ``Host`` values (any port) are
accepted, which is why the sidecar sends the upstream's own ``Host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Any

try:
    import uvicorn
    from mcp.server import MCPServer
    from mcp.server.auth.provider import TokenVerifier
    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import Context
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.applications import Starlette
except ImportError as missing:  # the plain package (and the container image) has no MCP server
    raise ImportError(f"the example MCP server needs the demo extra: pip install 'toolio-sidecar[demo]' "
                      f"({missing})") from missing

__all__ = [
    "ALLOWED_HOSTS",
    "ALLOWED_ORIGINS",
    "MCP_PATH",
    "ExampleServerHandle",
    "build_example_app",
    "build_example_server",
    "serve_example_server",
]

MCP_PATH = "/mcp"

ALLOWED_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
ALLOWED_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]

# Identity headers the sidecar adds (docs/reference/headers.md); ``whoami`` reports them under these keys.
_IDENTITY_HEADERS = {
    "key_id": "x-toolio-key-id",
    "key_name": "x-toolio-key-name",
    "workspace": "x-toolio-workspace",
    "roles": "x-toolio-roles",
    "permissions": "x-toolio-permissions",
    "subject": "x-toolio-subject",
}
_FORWARDED_HEADERS = {
    "forwarded_for": "x-forwarded-for",
    "forwarded_proto": "x-forwarded-proto",
    "forwarded_host": "x-forwarded-host",
}
_COUNTED_PREFIXES = ("x-toolio-", "x-forwarded-")
_COUNTED_NAMES = ("authorization", "host", "forwarded")


def _header_items(ctx: Context[Any, Any]) -> list[tuple[str, str]]:
    """All (lower-cased name, value) pairs of the HTTP request behind this tool call.

    ``ctx.request_context.request`` is the Starlette ``Request`` on both Streamable HTTP
    eras (``None`` on stdio); ``Headers.items()`` keeps repeated headers apart.
    """
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return []
    items = headers.items()
    return [(str(name).lower(), str(value)) for name, value in items]


def _whoami(ctx: Context[Any, Any]) -> dict[str, Any]:
    items = _header_items(ctx)
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, value in items:
        first.setdefault(name, value)
        if name.startswith(_COUNTED_PREFIXES) or name in _COUNTED_NAMES:
            counts[name] = counts.get(name, 0) + 1
    result: dict[str, Any] = {key: first.get(header) for key, header in _IDENTITY_HEADERS.items()}
    result.update({key: first.get(header) for key, header in _FORWARDED_HEADERS.items()})
    result["host"] = first.get("host")
    result["assertion_present"] = "x-toolio-assertion" in first
    result["authorization_present"] = "authorization" in first
    result["header_counts"] = dict(sorted(counts.items()))
    result["protocol_version"] = ctx.protocol_version
    result["session_id"] = first.get("mcp-session-id")
    return result


def build_example_server(auth: AuthSettings | None = None, token_verifier: TokenVerifier | None = None) -> MCPServer:
    """The example server: ``add``, ``echo``, ``slow_count`` (progress) and ``whoami``.

    With ``auth`` and ``token_verifier`` it is an MCP server that does its own OAuth (the SDK's
    resource server: a 401 challenge, protected resource metadata), as one behind a sidecar in
    ``oauth.mode = "pass-through"`` would be."""
    server: MCPServer = MCPServer(
        "toolio-example",
        instructions="Example MCP server bundled with toolio-sidecar.",
        log_level="WARNING",
        auth=auth,
        token_verifier=token_verifier,
    )

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Count to `steps`, sleeping `delay` seconds per step and reporting progress.")
    async def slow_count(steps: int, delay: float, ctx: Context[Any, Any]) -> str:
        for i in range(1, steps + 1):
            await asyncio.sleep(delay)
            await ctx.report_progress(i, steps, f"step {i}/{steps}")
        return f"counted to {steps}"

    @server.tool(description="The identity headers this server received with the call.")
    def whoami(ctx: Context[Any, Any]) -> dict[str, Any]:
        return _whoami(ctx)

    return server


def build_example_app(server: MCPServer | None = None, *, stateless: bool = False,
                      json_response: bool = False) -> Starlette:
    """The Starlette ASGI app serving ``server`` (default: a new example server) at ``/mcp``.

    Each call needs a fresh ``MCPServer``: the app's lifespan runs the SDK's session
    manager, which can be started only once.
    """
    srv = server if server is not None else build_example_server()
    return srv.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=stateless,
        # SSE responses by default, so progress notifications stream while a tool runs.
        json_response=json_response,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=list(ALLOWED_HOSTS),
            allowed_origins=list(ALLOWED_ORIGINS),
        ),
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the host process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ExampleServerHandle:
    """Runs the example server with uvicorn as a task in the current event loop.

    ``port=0`` picks a free port; after :meth:`start` it is in :attr:`port`.
    Usable as ``async with ExampleServerHandle(...) as handle:``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stateless: bool = False,
        server: MCPServer | None = None,
        json_response: bool = False,
        shutdown_timeout: int = 3,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        self.stateless = stateless
        self._mcp_server = server
        self._json_response = json_response
        self._shutdown_timeout = shutdown_timeout
        self._uvicorn: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint, ``http://host:port/mcp``."""
        return self.base_url + MCP_PATH

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, startup_timeout: float = 10.0) -> None:
        """Start serving; returns once the socket is listening (and the lifespan has run)."""
        if self._task is not None:
            raise RuntimeError("example server already started")
        app = build_example_app(self._mcp_server, stateless=self.stateless, json_response=self._json_response)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self._requested_port,
            log_level="warning",
            lifespan="on",
            http="h11",
            ws="none",
            # Don't replace the host process's logging configuration.
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=self._shutdown_timeout,
        )
        self._uvicorn = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._uvicorn.serve(), name="toolio-example-server")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + startup_timeout
        while not self._uvicorn.started:
            if self._task.done():
                await self._fail_start("example server stopped during start-up")
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"example server did not start within {startup_timeout} s")
            await asyncio.sleep(0.01)
        self.port = self._bound_port(self._uvicorn)

    async def _fail_start(self, message: str) -> None:
        task = self._task
        self._task = None
        self._uvicorn = None
        assert task is not None
        try:
            await task
        except BaseException as exc:  # uvicorn reports start-up failures with SystemExit
            raise RuntimeError(f"{message}: {exc!r}") from exc
        raise RuntimeError(message)

    @staticmethod
    def _bound_port(server: uvicorn.Server) -> int:
        for listener in server.servers:
            for sock in listener.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        raise RuntimeError("example server has no listening TCP socket")

    async def stop(self) -> None:
        """Stop serving and wait for the task to end (idempotent)."""
        task, server = self._task, self._uvicorn
        self._task = None
        self._uvicorn = None
        if task is None or server is None:
            return
        server.should_exit = True
        # uvicorn's own graceful-shutdown timeout bounds this; cancel as a last resort.
        done, _ = await asyncio.wait({task}, timeout=self._shutdown_timeout + 5)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception, SystemExit):
            await task

    async def __aenter__(self) -> ExampleServerHandle:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve_example_server(host: str, port: int, *, stateless: bool = False) -> ExampleServerHandle:
    """Start the example server on ``host:port`` (0 = any free port) and return its handle.

    Call ``await handle.stop()`` when done.
    """
    handle = ExampleServerHandle(host, port, stateless=stateless)
    await handle.start()
    return handle
