"""Many workspaces behind one deployment (docs/reference/config.md, [workspaces]): the workspace
of a public request comes from its host, matched strictly; a key of another workspace is an
unknown key in every way; the admin API sees only the signed-in key's workspace."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from mcp import MCPError

from sidecar.gate.workspaces import HostWorkspaces
from sidecar.keys.format import generate_key
from sidecar.settings import SettingsError, WorkspacesSettings, settings_from_mapping
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter
from tests.support.mcp import mcp_client, mcp_url
from tests.support.processes import run_cli
from tests.support.raw import exchange, raw_request
from tests.support.upstreams import RecordingUpstream

MULTI = {"workspaces": {"from_host": "{workspace}.toolio.com"}}


def _multi(config: ConfigFactory, upstream: str, **extra: Any) -> Any:
    document = config.mapping({"proxy": {"upstream": upstream}, **MULTI, **extra})
    del document["workspace"]
    return settings_from_mapping(document, {}, base_dir=config.tmp_path)


# -- the host rule ---------------------------------------------------------------------------------

MATCHER = HostWorkspaces(WorkspacesSettings(from_host="{workspace}.toolio.com"), ())


@pytest.mark.parametrize(("host", "workspace"), [
    ("acme.toolio.com", "acme"),
    ("ACME.Toolio.COM", "acme"),
    ("acme.toolio.com:443", "acme"),
    ("acme.toolio.com:", "acme"),            # RFC 3986 3.2.3: port = *DIGIT, may be empty
    ("a-1.toolio.com", "a-1"),
    ("9.toolio.com", "9"),
])
def test_a_host_of_the_template_names_its_workspace(host: str, workspace: str) -> None:
    assert MATCHER.match(host) == workspace


@pytest.mark.parametrize("host", [
    "acme.toolio.com.evil.test", "acme.toolio.com.", "x.acme.toolio.com", "toolio.com", ".toolio.com",
    "acme.toolio.comm", "acme-toolio.com", "acmetoolio.com", "acme.toolio.com:x",
    "acme.toolio.com:80:80", "acme.toolio.com:65536",
    "[::1]", "[::1]:443", "[acme.toolio.com]", "127.0.0.1", "-acme.toolio.com", "acme-.toolio.com",
    "ac_me.toolio.com", "%61cme.toolio.com", "ac%2eme.toolio.com", "a" * 64 + ".toolio.com", "", " ",
    "acme.toolio.com ,globex.toolio.com", "acme.toolio.com\t.x",
])
def test_anything_else_names_no_workspace(host: str) -> None:
    assert MATCHER.match(host) is None


def test_an_allow_list_limits_the_workspaces() -> None:
    matcher = HostWorkspaces(WorkspacesSettings(from_host="{workspace}.toolio.com", allowed=frozenset({"acme"})), ())
    assert matcher.match("acme.toolio.com") == "acme"
    assert matcher.match("globex.toolio.com") is None


def test_the_placeholder_may_share_its_label() -> None:
    matcher = HostWorkspaces(WorkspacesSettings(from_host="mcp-{workspace}.eu.toolio.com"), ())
    assert matcher.match("mcp-acme.eu.toolio.com") == "acme"
    assert matcher.match("acme.eu.toolio.com") is None


# -- the config ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "key"), [
    ({"workspaces": {"from_host": "{workspace}.toolio.com"}}, "workspace"),   # beside the base's workspace
    ({"workspaces": {}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "toolio.com"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "{workspace}"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "{workspace}.{workspace}.com"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "{workspace}.toolio.com:8080"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "{workspace}.toolio.com."}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "*.toolio.com"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "x.{workspace}_a.toolio.com"}}, "workspaces.from_host"),
    ({"workspaces": {"from_host": "{workspace}.toolio.com", "allowed": ["Acme"]}}, "workspaces.allowed[0]"),
    ({"workspaces": {"from_host": "{workspace}.toolio.com", "allowed": ["a.b"]}}, "workspaces.allowed[0]"),
    ({"workspaces": {"from_host": "{workspace}.toolio.com", "from": 1}}, "workspaces.from"),
])
def test_a_bad_workspaces_table_names_the_key(config: ConfigFactory, overrides: dict[str, Any], key: str) -> None:
    document = config.mapping(overrides)
    if key != "workspace":
        del document["workspace"]
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping(document, {})
    assert caught.value.key == key


def test_validate_mode_is_refused_with_workspaces(config: ConfigFactory) -> None:
    with pytest.raises(SettingsError) as caught:
        _multi(config, "http://127.0.0.1:9", oauth={"mode": "validate", "resource": "https://mcp.example.com/mcp",
                                                    "issuer": "https://id.example.com"})
    assert caught.value.key == "oauth.mode"


def test_single_workspace_mode_is_unchanged(config: ConfigFactory) -> None:
    settings = config.settings()
    assert settings.workspace == "acme"
    assert not settings.multi_workspace


# -- through the proxy ---------------------------------------------------------------------------

async def _two_workspaces(config: ConfigFactory, start_sidecar: SidecarStarter, upstream: str,
                          **extra: Any) -> tuple[RunningSidecar, dict[str, str]]:
    sidecar = await start_sidecar(_multi(config, upstream, **extra))
    keys = {}
    for workspace in ("acme", "globex"):
        _, keys[workspace] = await sidecar.services.keys.create(
            name="agent", roles=["viewer"], actor="test", client=None, workspace=workspace)
    return sidecar, keys


def _get(host: str, key: str | None = None, **more: str) -> list[tuple[str, str]]:
    fields = [("Host", host)] if host else []
    if key is not None:
        fields.append(("Authorization", f"Bearer {key}"))
    fields.extend(more.items())
    return fields


@pytest.mark.parametrize("host", [
    "acme.toolio.com.evil.test", "acme.toolio.com.", "x.acme.toolio.com", "[::1]:8080", "127.0.0.1",
    "toolio.com", "acme.toolio.com:99999",
])
async def test_a_host_of_no_workspace_gets_421_before_any_key_is_read(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream, host: str) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, echo.url)
    resp = await raw_request(sidecar.proxy_port, "GET", "/mcp", _get(host, keys["acme"]))
    assert resp.status == 421
    assert resp.json()["error"] == "misdirected_request"
    assert resp.header("Content-Type") == "application/json"
    assert echo.requests == []


async def test_http_10_without_host_gets_421(config: ConfigFactory, start_sidecar: SidecarStarter,
                                             echo: RecordingUpstream) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, echo.url)
    data = await exchange(sidecar.proxy_port,
                          f"GET /mcp HTTP/1.0\r\nAuthorization: Bearer {keys['acme']}\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 421") or data.startswith(b"HTTP/1.0 421")
    assert echo.requests == []


async def test_each_key_works_at_its_own_host_and_carries_its_workspace(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, echo.url)
    for workspace in ("acme", "globex"):
        resp = await raw_request(sidecar.proxy_port, "GET", "/mcp",
                                 _get(f"{workspace}.TOOLIO.com:8080", keys[workspace]))
        assert resp.status == 200
        seen = echo.requests[-1]
        assert seen.all("x-toolio-workspace") == [workspace]
    access = [line for line in sidecar.log_lines() if line.get("type") == "access"]
    assert {line["workspace"] for line in access} == {"acme", "globex"}


async def test_another_workspaces_key_is_refused_exactly_as_an_unknown_key(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, echo.url)
    unknown = await raw_request(sidecar.proxy_port, "GET", "/mcp", _get("acme.toolio.com", generate_key().full))
    # Twice: the first time from the store, the second from the negative cache; and once more
    # after the key was verified (and cached) at its own host.
    answers = [await raw_request(sidecar.proxy_port, "GET", "/mcp", _get("acme.toolio.com", keys["globex"]))
               for _ in range(2)]
    own = await raw_request(sidecar.proxy_port, "GET", "/mcp", _get("globex.toolio.com", keys["globex"]))
    assert own.status == 200  # a refusal at another host never poisons the key at its own
    answers.append(await raw_request(sidecar.proxy_port, "GET", "/mcp", _get("acme.toolio.com", keys["globex"])))
    for answer in answers:
        assert answer.status == unknown.status == 401
        assert answer.body == unknown.body
        assert answer.header("WWW-Authenticate") == unknown.header("WWW-Authenticate")
        assert sorted(n.lower() for n, _ in answer.headers if n.lower() != "date") == \
            sorted(n.lower() for n, _ in unknown.headers if n.lower() != "date")
    assert len(echo.requests) == 1
    await sidecar.services.flush()
    events = await sidecar.services.store.list_audit("acme", 50, None, action="auth.failed")
    assert events and all(e.key_id is None and e.key_name is None for e in events)
    assert all(set(e.details["reasons"]) == {"invalid"} for e in events)
    assert await sidecar.services.store.list_audit("globex", 50, None, action="auth.failed") == []


async def test_a_trusted_proxy_names_the_host_in_x_forwarded_host(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, echo.url)
    untrusted = await raw_request(sidecar.proxy_port, "GET", "/mcp",
                                  _get("internal:8080", keys["acme"], **{"X-Forwarded-Host": "acme.toolio.com"}))
    assert untrusted.status == 421
    sidecar2 = await start_sidecar(_multi(config, echo.url, proxy={"upstream": echo.url,
                                                                     "trusted_proxies": ["127.0.0.0/8"]}))
    _, acme = await sidecar2.services.keys.create(name="agent2", roles=["viewer"], actor="t", client=None,
                                                  workspace="acme")
    ok = await raw_request(sidecar2.proxy_port, "GET", "/mcp",
                           _get("internal:8080", acme, **{"X-Forwarded-Host": "acme.toolio.com"}))
    assert ok.status == 200
    several = await raw_request(sidecar2.proxy_port, "GET", "/mcp",
                                _get("acme.toolio.com", acme, **{"X-Forwarded-Host": "acme.toolio.com, x.test"}))
    assert several.status == 421


async def test_two_workspaces_through_one_sidecar_with_the_mcp_sdk(
        config: ConfigFactory, start_sidecar: SidecarStarter, mcp_upstream: str) -> None:
    sidecar, keys = await _two_workspaces(config, start_sidecar, mcp_upstream)
    url = mcp_url(sidecar.proxy_url)
    for workspace in ("acme", "globex"):
        async with mcp_client(url, token=keys[workspace], extra_headers={"Host": f"{workspace}.toolio.com"}) as client:
            result = await client.call_tool("whoami", {})
            text = result.content[0].text  # type: ignore[union-attr]
            assert json.loads(text)["workspace"] == workspace
    # Another workspace's key at acme's host never gets a session.
    with pytest.raises((MCPError, ExceptionGroup)) as caught:
        async with mcp_client(url, token=keys["globex"], extra_headers={"Host": "acme.toolio.com"}) as client:
            await client.call_tool("whoami", {})
    assert any(isinstance(e, MCPError) for e in _leaves(caught.value))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


# -- the admin API ------------------------------------------------------------------------------------

async def test_the_admin_api_sees_only_the_signed_in_keys_workspace(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream, both_stores: str) -> None:
    sidecar = await start_sidecar(_multi(config, echo.url))
    keys = sidecar.services.keys
    admins = {}
    agents = {}
    for workspace in ("acme", "globex"):
        _, admins[workspace] = await keys.create(name="ops", roles=["org-admin"], actor="cli", client=None,
                                                 workspace=workspace)
        agents[workspace], _ = await keys.create(name="agent", roles=["viewer"], actor="cli", client=None,
                                                 workspace=workspace)
    api = sidecar.admin_url + "/admin/api"
    async with aiohttp.ClientSession(trust_env=False) as http:
        async def call(method: str, path: str, workspace: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, api + path, json=body,
                                    headers={"Authorization": f"Bearer {admins[workspace]}"}) as resp:
                return resp.status, await resp.json()

        status, listed = await call("GET", "/keys", "acme")
        assert status == 200
        assert {k["workspace"] for k in listed["keys"]} == {"acme"}
        # Paging (a key a page, by name, with a search matching both workspaces' keys) stays in it.
        seen: list[tuple[str, str]] = []
        cursor = ""
        while True:
            status, page = await call("GET", f"/keys?limit=1&sort=name&q=a&cursor={cursor}", "acme")
            assert status == 200, page
            seen.extend((k["workspace"], k["name"]) for k in page["keys"])
            if page["next_cursor"] is None:
                break
            cursor = page["next_cursor"]
        assert seen == [("acme", "agent")]
        theirs = agents["globex"].id
        for method, path in [("GET", f"/keys/{theirs}"), ("POST", f"/keys/{theirs}/disable"),
                             ("POST", f"/keys/{theirs}/enable"), ("GET", f"/keys/{theirs}/activity")]:
            status, body = await call(method, path, "acme")
            assert status == 404, (method, path, body)
        status, body = await call("POST", f"/keys/{theirs}/rotate", "acme", {"name": "stolen"})
        assert status == 404
        status, created = await call("POST", "/keys", "acme", {"name": "new", "roles": ["viewer"]})
        assert status == 201 and created["workspace"] == "acme"
        # The same name is free in another workspace: names are unique within one.
        status, created = await call("POST", "/keys", "globex", {"name": "new", "roles": ["viewer"]})
        assert status == 201 and created["workspace"] == "globex"
        for workspace in ("acme", "globex"):
            status, audit = await call("GET", "/audit?limit=500", workspace)
            assert status == 200
            assert audit["events"]
            assert {e["workspace"] for e in audit["events"]} == {workspace}
    assert (await sidecar.services.store.get_key(theirs)).status == "enabled"  # type: ignore[union-attr]


# -- the CLI -----------------------------------------------------------------------------------------

async def test_the_cli_takes_a_workspace_and_needs_one_to_create(config: ConfigFactory) -> None:
    document = config.mapping(MULTI)
    del document["workspace"]
    path = config.write(raw=document)
    missing = await run_cli("keys", "create", "--config", str(path), "--name", "ops", "--role", "org-admin", "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stderr)["field"] == "workspace"
    bad = await run_cli("keys", "create", "--config", str(path), "--name", "ops", "--role", "org-admin",
                        "--workspace", "Acme.Corp", "--json")
    assert bad.returncode == 2
    assert json.loads(bad.stderr)["field"] == "workspace"
    ids = {}
    for workspace in ("acme", "globex"):
        made = await run_cli("keys", "create", "--config", str(path), "--name", "ops", "--role", "org-admin",
                             "--workspace", workspace, "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        assert created["workspace"] == workspace
        ids[workspace] = created["id"]
    every = json.loads((await run_cli("keys", "list", "--config", str(path), "--json")).stdout)
    assert {k["workspace"] for k in every["keys"]} == {"acme", "globex"}
    one = json.loads((await run_cli("keys", "list", "--config", str(path), "--workspace", "acme", "--json")).stdout)
    assert [k["id"] for k in one["keys"]] == [ids["acme"]]
    elsewhere = await run_cli("keys", "disable", ids["globex"], "--config", str(path), "--workspace", "acme")
    assert elsewhere.returncode == 1  # not found in acme
    # Every workspace a page at a time, by name: the two keys named "ops" both, in id order.
    by_name = json.loads((await run_cli("keys", "list", "--config", str(path), "--sort", "name", "--json")).stdout)
    assert [k["id"] for k in by_name["keys"]] == sorted(ids.values())
    table = await run_cli("keys", "list", "--config", str(path))
    assert table.stdout.splitlines()[0].startswith("WORKSPACE")
    assert sorted(line.split()[0] for line in table.stdout.splitlines()[1:]) == ["acme", "globex"]
    # A key named by its name needs its workspace (names repeat across workspaces); an id does not.
    named = await run_cli("keys", "show", "ops", "--config", str(path), "--workspace", "globex", "--json")
    assert json.loads(named.stdout)["id"] == ids["globex"]
    unscoped = await run_cli("keys", "show", "ops", "--config", str(path), "--json")
    assert (unscoped.returncode, json.loads(unscoped.stderr)["field"]) == (2, "workspace")
    by_id = await run_cli("keys", "show", ids["globex"], "--config", str(path), "--json")
    assert json.loads(by_id.stdout)["workspace"] == "globex"
    # The audit log is read one workspace at a time.
    no_workspace = await run_cli("audit", "list", "--config", str(path), "--json")
    assert (no_workspace.returncode, json.loads(no_workspace.stderr)["field"]) == (2, "workspace")
    audit = await run_cli("audit", "list", "--config", str(path), "--workspace", "globex", "--key", "ops", "--json")
    events = json.loads(audit.stdout)["events"]
    assert [(e["action"], e["workspace"], e["key_id"]) for e in events] == [("key.created", "globex", ids["globex"])]
    single = config.write()
    other = await run_cli("keys", "list", "--config", str(single), "--workspace", "globex")
    assert other.returncode == 2
