"""The code in docs/examples/, run as the docs tell readers to run it (docs/server-authors.md,
docs/agent-developers.md): the PyJWT verifier and the MCP SDK identity middleware behind a real
sidecar, the Python client, and the TypeScript verifier (jose) and client (the MCP TypeScript
SDK) under Node."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest
import uvicorn

from sidecar.keys.records import KeyRecord
from tests.support.config import REPOSITORY, ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.mcp import mcp_client, mcp_url, tool_result_text
from tests.support.polling import eventually
from tests.support.raw import LOOPBACK, free_port
from tests.support.upstreams import RecordingUpstream

EXAMPLES = REPOSITORY / "docs" / "examples"
TYPESCRIPT = EXAMPLES / "typescript"


def example(name: str) -> ModuleType:
    """A module of docs/examples, imported the way a reader would (the folder on sys.path)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def jwks_url(sidecar: RunningSidecar) -> str:
    return sidecar.admin_url + "/.well-known/jwks.json"


async def assertion_for(sidecar: RunningSidecar, echo: RecordingUpstream, key: str, target: str = "/mcp?x=1") -> str:
    """A real X-Toolio-Assertion: what the sidecar sent upstream for one POST."""
    async with client_session() as http, http.post(sidecar.proxy_url + target, data=b"{}", headers=bearer(key)) as resp:
        assert resp.status == 200
    [token] = echo.requests[-1].all("X-Toolio-Assertion")
    return token


@pytest.fixture
async def signed(sidecar: RunningSidecar, echo: RecordingUpstream) -> tuple[RunningSidecar, KeyRecord, str]:
    record, key = await sidecar.create_key("planner", ("viewer", "writer"))
    return sidecar, record, await assertion_for(sidecar, echo, key)


async def test_pyjwt_verifier_returns_the_callers_identity(signed: tuple[RunningSidecar, KeyRecord, str]) -> None:
    sidecar, record, token = signed
    verifier = example("verify_pyjwt").AssertionVerifier(jwks_url(sidecar))
    claims = await asyncio.to_thread(verifier.verify, token, method="POST", path_qs="/mcp?x=1")
    assert claims["sub"] == record.id
    assert claims["name"] == "planner"
    assert claims["ws"] == "acme"
    assert claims["roles"] == ["viewer", "writer"]
    assert claims["perms"] == ["plans:read", "plans:write"]


async def test_pyjwt_verifier_refuses_another_request_a_forgery_and_a_stranger(
        signed: tuple[RunningSidecar, KeyRecord, str], config: ConfigFactory, start_sidecar: SidecarStarter,
        echo: RecordingUpstream) -> None:
    sidecar, _, token = signed
    verifier = example("verify_pyjwt").AssertionVerifier(jwks_url(sidecar))

    def refused(token: str, method: str = "POST", path_qs: str = "/mcp?x=1") -> str:
        with pytest.raises(jwt.InvalidTokenError) as failure:
            verifier.verify(token, method=method, path_qs=path_qs)
        return str(failure.value)

    assert "another method" in await asyncio.to_thread(refused, token, "GET")
    assert "another path" in await asyncio.to_thread(refused, token, "POST", "/mcp")
    head, body, signature = token.split(".")
    forged_body = jwt.utils.base64url_encode(json.dumps(
        {**json.loads(jwt.utils.base64url_decode(body)), "perms": ["org:settings"]}).encode()).decode()
    await asyncio.to_thread(refused, f"{head}.{forged_body}.{signature}")
    # Signed by another sidecar (another signing key): its kid is not in this JWKS.
    other = await start_sidecar(ConfigFactory(config.tmp_path / "other").settings({"proxy": {"upstream": echo.url}}))
    _, other_key = await other.create_key()
    assert "signing key" in await asyncio.to_thread(refused, await assertion_for(other, echo, other_key))


async def test_replay_cache_refuses_the_same_assertion_twice(signed: tuple[RunningSidecar, KeyRecord, str]) -> None:
    sidecar, _, token = signed
    module = example("verify_pyjwt")
    verifier = module.AssertionVerifier(jwks_url(sidecar), replay_cache=module.ReplayCache())
    await asyncio.to_thread(verifier.verify, token, method="POST", path_qs="/mcp?x=1")
    with pytest.raises(module.ReplayError):
        await asyncio.to_thread(verifier.verify, token, method="POST", path_qs="/mcp?x=1")


async def test_leeway_accepts_an_assertion_just_past_its_expiry(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": echo.url},
                                                   "signing": {"lifetime_seconds": 1}}))
    _, key = await sidecar.create_key()
    token = await assertion_for(sidecar, echo, key)
    module = example("verify_pyjwt")
    strict = module.AssertionVerifier(jwks_url(sidecar), leeway=0)
    tolerant = module.AssertionVerifier(jwks_url(sidecar), leeway=30)

    def expired_without_leeway() -> bool:
        try:
            strict.verify(token, method="POST", path_qs="/mcp?x=1")
        except jwt.ExpiredSignatureError:
            return True
        return False

    await eventually(lambda: asyncio.to_thread(expired_without_leeway), within=10, what="assertion expiry")
    assert (await asyncio.to_thread(tolerant.verify, token, method="POST", path_qs="/mcp?x=1"))["sub"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave the test process's signal handlers alone
        yield


@contextlib.asynccontextmanager
async def served(app: Any, port: int) -> AsyncIterator[str]:
    server = _Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", lifespan="on",
                                    http="h11", ws="none", log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), within=10, what="uvicorn started")
    assert not task.done(), "the example MCP server did not start"
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def identity_server(config: ConfigFactory, start_sidecar: SidecarStarter) -> AsyncIterator[RunningSidecar]:
    """docs/examples/mcp_identity.py's server, reached only through a sidecar."""
    port = free_port()
    sidecar = await start_sidecar(config.settings({"proxy": {"upstream": f"http://{LOOPBACK}:{port}"}}))
    verify = example("verify_pyjwt")
    verifier = verify.AssertionVerifier(jwks_url(sidecar), replay_cache=verify.ReplayCache())
    app = example("mcp_identity").build_app(verifier, allowed_hosts=[f"{LOOPBACK}:*"])
    async with served(app, port):
        yield sidecar


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_tool_handlers_get_the_verified_identity_through_the_sidecar(
        identity_server: RunningSidecar, mode: str) -> None:
    record, key = await identity_server.create_key("planner", ("viewer",))
    async with mcp_client(mcp_url(identity_server.proxy_url), token=key, mode=mode) as client:
        seen = (await client.call_tool("whoami", {})).structured_content
        refused = await client.call_tool("rename_plan", {"plan": "q3", "name": "Q3"})
    assert seen == {"key_id": record.id, "key_name": "planner", "workspace": "acme", "roles": ["viewer"],
                    "permissions": ["plans:read"]}
    assert refused.is_error
    assert "needs plans:write" in tool_result_text(refused)
    _, writer = await identity_server.create_key("writer", ("writer",))
    async with mcp_client(mcp_url(identity_server.proxy_url), token=writer, mode=mode) as client:
        renamed = await client.call_tool("rename_plan", {"plan": "q3", "name": "Q3"})
    assert tool_result_text(renamed) == "q3 is now called Q3"


async def test_the_middleware_refuses_requests_that_bypass_the_sidecar(identity_server: RunningSidecar) -> None:
    upstream = identity_server.settings.proxy.upstream
    _, key = await identity_server.create_key()
    async with client_session() as http:
        async with http.post(upstream + "/mcp", json={}, headers=bearer(key)) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "missing_assertion"
        forged = {"X-Toolio-Assertion": "eyJhbGciOiJub25lIn0.e30.", **bearer(key)}
        async with http.post(upstream + "/mcp", json={}, headers=forged) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_assertion"


async def test_python_client_example_calls_a_tool_and_explains_refusals(
        identity_server: RunningSidecar, caplog: pytest.LogCaptureFixture) -> None:
    client = example("mcp_client")
    _, key = await identity_server.create_key("agent-7")
    url = mcp_url(identity_server.proxy_url)
    assert (await client.call_whoami(url, key))["key_name"] == "agent-7"
    caplog.set_level(logging.WARNING, logger="toolio.client")
    with pytest.raises(ExceptionGroup) as refused:  # refused while connecting: the SDK's task group
        await client.call_whoami(url, key[:-1] + ("x" if key[-1] != "x" else "y"))
    # What docs/agent-developers.md (Troubleshooting) says the SDK shows: no status, hence the hook.
    assert {(type(e).__name__, str(e)) for e in leaves(refused.value)} == {
        ("MCPError", "Server returned an error response")}
    assert "HTTP 401 invalid_token" in caplog.text
    assert key[:-1] not in caplog.text


def leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


# --- TypeScript (Node) --------------------------------------------------------------------


def npm_ready() -> Path:
    """docs/examples/typescript with its locked dependencies installed (npm ci, once)."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is missing: the TypeScript examples run under Node"
    if not (TYPESCRIPT / "node_modules" / ".package-lock.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=TYPESCRIPT, check=True,
                       timeout=240)
    return TYPESCRIPT


@pytest.fixture(scope="module")
def compiled() -> Path:
    """The TypeScript examples type-checked (strict) and compiled by tsc into their dist/ folder
    (beside node_modules, where Node resolves the packages from)."""
    folder = npm_ready()
    result = subprocess.run([str(folder / "node_modules" / ".bin" / "tsc"), "-p", str(folder)],
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "dist"


async def node(script: Path, *args: str) -> dict[str, Any]:
    """Run a compiled example with Node; its one line of JSON output."""
    proc = await asyncio.create_subprocess_exec("node", str(script), *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, cwd=TYPESCRIPT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_typescript_jose_verifier_returns_the_identity_and_refuses_a_replay(
        compiled: Path, signed: tuple[RunningSidecar, KeyRecord, str]) -> None:
    sidecar, record, token = signed
    result = await node(compiled / "verify.js", jwks_url(sidecar), token, "POST", "/mcp?x=1")
    assert result["identity"] == {"keyId": record.id, "keyName": "planner", "workspace": "acme",
                                  "roles": ["viewer", "writer"], "permissions": ["plans:read", "plans:write"]}
    assert result["replay"] == "refused: assertion already used"
    assert result["otherPath"].startswith("refused: ")
    assert result["forged"].startswith("refused: ")


async def test_typescript_sdk_client_calls_a_tool_and_shows_the_status_of_a_refusal(
        compiled: Path, identity_server: RunningSidecar) -> None:
    _, key = await identity_server.create_key("ts-agent")
    url = mcp_url(identity_server.proxy_url)
    called = await node(compiled / "client.js", url, key)
    assert called["whoami"]["key_name"] == "ts-agent"
    refused = await node(compiled / "client.js", url, "tak_" + "0" * 46)
    assert "401" in refused["error"]
    assert "invalid_token" in refused["error"]
