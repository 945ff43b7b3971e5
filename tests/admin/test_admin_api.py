"""The admin API over real TCP: both listeners, each store (SQLite file, PostgreSQL schema), the
example MCP upstream.

Covers docs/reference/admin-api.md (every endpoint and error of the table, sessions, CSRF; audit
rows name the key and the actor; no key material anywhere after creation) and
docs/reference/keys.md (disable means now: next request refused, open streams cut within 1 s).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientPayloadError
from openapi_spec_validator import validate

from admin.app import CSP
from tests.support.admin import (
    MCP_HEADERS,
    PROTOCOL,
    AdminSidecar,
    admin_sidecar,
    assert_matches,
    initialize_message,
    session_cookie,
)

# The same tests on both stores (SQLite, PostgreSQL): docs/operations.md, Several replicas.
pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("both_stores")]

KEY_SHAPE = re.compile(r"tak_[0-9A-Za-z]{46}")


def _in(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat().replace("+00:00", "Z")


# ---- who may manage keys ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/keys"), ("POST", "/keys"), ("GET", "/keys/key_x"), ("PATCH", "/keys/key_x"),
    ("POST", "/keys/key_x/disable"),
    ("POST", "/keys/key_x/enable"), ("POST", "/keys/key_x/rotate"), ("GET", "/keys/key_x/activity"),
    ("GET", "/roles"), ("GET", "/audit"),
    ("GET", "/openapi.json"), ("GET", "/session"), ("DELETE", "/session"),
])
async def test_request_without_key_gets_401(tmp_path: Path, method: str, path: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, resp = await sc.call(method, path, auth=False, json_body={"name": "x", "roles": ["viewer"]})
    assert status == 401
    assert body["error"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="toolio"'
    assert resp.headers["Cache-Control"] == "no-store"


async def test_non_admin_key_gets_403(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        viewer = await sc.create_key("reader", ["viewer", "writer"])
        for method, path in (("GET", "/keys"), ("POST", "/keys"), ("GET", "/audit"),
                             (("POST", f"/keys/{sc.admin_key_id}/disable"))):
            status, body, _ = await sc.call(method, path, key=viewer["key"],
                                            json_body={"name": "sneaky", "roles": ["org-admin"]})
            assert status == 403, (method, path)
            assert body["error"] == "forbidden"
            assert "org:settings" in body["message"]
        _, keys, _ = await sc.call("GET", "/keys")
    assert [k["name"] for k in keys["keys"]] == ["ops", "reader"]
    assert all(k["status"] == "enabled" for k in keys["keys"])


async def test_wrong_or_malformed_admin_key_is_refused(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        wrong = sc.admin_key[:-8] + ("A" if sc.admin_key[-8] != "A" else "B") + sc.admin_key[-7:]
        status, body, _ = await sc.call("GET", "/keys", key=wrong)
        assert status == 401
        assert body["error"] == "invalid_token"
        status, body, _ = await sc.call("GET", "/keys", auth=False, headers={"Authorization": "Basic abc"})
        assert status == 400
        assert body["error"] == "invalid_request"
    assert wrong not in json.dumps(body)


async def test_disabled_admin_key_loses_access_at_once(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        second = await sc.create_key("ops2", ["org-admin"])
        assert (await sc.call("GET", "/keys", key=second["key"]))[0] == 200
        assert (await sc.call("POST", f"/keys/{second['id']}/disable"))[0] == 200
        status, body, _ = await sc.call("GET", "/keys", key=second["key"])
    assert status == 401
    assert body["error"] == "invalid_token"


# ---- keys ------------------------------------------------------------------------------------


async def test_create_returns_the_full_key_once_and_then_only_the_preview(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc:
        status, created, resp = await sc.call("POST", "/keys",
                                              json_body={"name": "ci-agent.1", "roles": ["writer", "viewer"]})
        assert status == 201
        assert_matches("NewKey", created)
        assert KEY_SHAPE.fullmatch(created["key"])
        assert created["preview"] == created["key"][:8] + "..."
        assert created["roles"] == ["viewer", "writer"]
        assert created["permissions"] == ["plans:read", "plans:write"]
        assert created["status"] == "enabled"
        assert created["created_by"] == "ops"
        assert created["workspace"] == "acme"
        assert resp.headers["Location"] == f"/admin/api/keys/{created['id']}"

        status, one, _ = await sc.call("GET", f"/keys/{created['id']}")
        assert status == 200
        assert_matches("Key", one)
        assert "key" not in one
        assert one == {k: v for k, v in created.items() if k != "key"}

        status, listed, _ = await sc.call("GET", "/keys")
        assert status == 200
        assert_matches("KeyList", listed)
        assert [k["name"] for k in listed["keys"]] == ["ops", "ci-agent.1"]
        assert "key" not in listed["keys"][1]
        # The new key works through the proxy straight away.
        assert await sc.proxy_status(created["key"]) == 200


async def test_create_with_expiry_in_the_future(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, created, _ = await sc.call("POST", "/keys", json_body={
            "name": "temp", "roles": ["viewer"], "expires_at": "2999-01-01T00:00:00Z"})
    assert status == 201
    assert created["expires_at"] == "2999-01-01T00:00:00.000Z"


@pytest.mark.parametrize(("body", "status", "error", "field"), [
    ({"name": "has space", "roles": ["viewer"]}, 422, "invalid_name", "name"),
    ({"name": "", "roles": ["viewer"]}, 422, "invalid_name", "name"),
    ({"name": "x" * 65, "roles": ["viewer"]}, 422, "invalid_name", "name"),
    ({"name": 7, "roles": ["viewer"]}, 422, "invalid_name", "name"),
    ({"roles": ["viewer"]}, 422, "missing_field", "name"),
    ({"name": "a"}, 422, "missing_field", "roles"),
    ({"name": "a", "roles": []}, 422, "invalid_roles", "roles"),
    ({"name": "a", "roles": "viewer"}, 422, "invalid_roles", "roles"),
    ({"name": "a", "roles": ["viewer", "root"]}, 422, "unknown_role", "roles"),
    ({"name": "a", "roles": ["viewer"], "expires_at": "2001-01-01T00:00:00Z"}, 422, "invalid_time", "expires_at"),
    ({"name": "a", "roles": ["viewer"], "expires_at": "tomorrow"}, 422, "invalid_time", "expires_at"),
    ({"name": "a", "roles": ["viewer"], "expires_at": "2999-01-01T00:00:00"}, 422, "invalid_time", "expires_at"),
    ({"name": "a", "roles": ["viewer"], "owner": "me"}, 422, "unknown_field", "owner"),
    ({"name": "ops", "roles": ["viewer"]}, 409, "name_taken", "name"),
])
async def test_invalid_create_names_the_bad_field(tmp_path: Path, body: dict[str, Any], status: int,
                                                  error: str, field: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        got, answer, resp = await sc.call("POST", "/keys", json_body=body)
        _, listed, _ = await sc.call("GET", "/keys")
    assert (got, answer["error"], answer["field"]) == (status, error, field)
    assert_matches("Error", answer)
    assert isinstance(answer["message"], str)
    assert resp.content_type == "application/json"
    assert len(listed["keys"]) == 1


async def test_a_key_name_with_a_trailing_newline_is_refused_on_create_and_on_rotate(tmp_path: Path) -> None:
    # A ^...$ rule lets "agent\n" through ("$" matches before a final newline in Python's re); the
    # name is sent upstream in X-Toolio-Key-Name, where a line break is never allowed (RFC 9110 5.5).
    async with admin_sidecar(tmp_path) as sc:
        status, answer, _ = await sc.call("POST", "/keys", json_body={"name": "agent\n", "roles": ["viewer"]})
        assert status == 422, answer
        assert (answer["error"], answer["field"]) == ("invalid_name", "name")
        old = await sc.create_key("agent", ["viewer"])
        status, answer, _ = await sc.call("POST", f"/keys/{old['id']}/rotate", json_body={"name": "agent-2\n"})
        assert status == 422, answer
        assert (answer["error"], answer["field"]) == ("invalid_name", "name")
        _, listed, _ = await sc.call("GET", "/keys")
    assert [k["name"] for k in listed["keys"]] == ["ops", "agent"]


async def test_unknown_role_error_lists_the_valid_roles(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        _, body, _ = await sc.call("POST", "/keys", json_body={"name": "a", "roles": ["root"]})
    assert body["valid_roles"] == ["org-admin", "viewer", "writer"]
    for role in ("org-admin", "viewer", "writer"):
        assert role in body["message"]


@pytest.mark.parametrize(("data", "status", "error"), [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b'["name", "roles"]', 422, "invalid_body"),
    (b'"a string"', 422, "invalid_body"),
])
async def test_malformed_body_is_a_json_error(tmp_path: Path, data: bytes, status: int, error: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        got, body, _ = await sc.call("POST", "/keys", data=data, headers={"Content-Type": "application/json"})
    assert (got, body["error"]) == (status, error)


async def test_body_over_64_kib_is_a_json_413(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        big = json.dumps({"name": "a", "roles": ["viewer"], "pad": "x" * 70_000}).encode()
        status, body, resp = await sc.call("POST", "/keys", data=big, headers={"Content-Type": "application/json"})
        assert status == 413
        assert body["error"] == "body_too_large"
        assert resp.headers["Cache-Control"] == "no-store"

        # Also without a Content-Length (chunked), and for the login endpoint.
        async def chunks() -> Any:
            for _ in range(20):
                yield b"x" * 4096

        async with sc.http.post(sc.api + "/session", data=chunks(),
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"] == "body_too_large"


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("POST", "/disable"), ("POST", "/enable"),
                                                ("POST", "/rotate")])
async def test_unknown_key_id_is_404(tmp_path: Path, method: str, suffix: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, _ = await sc.call(method, f"/keys/key_doesnotexist{suffix}",
                                        json_body={"name": "new-one"} if suffix == "/rotate" else None)
    assert status == 404
    assert body["error"] == "not_found"
    assert body["field"] == "id"


async def test_unknown_admin_paths_are_json_404_and_wrong_methods_json_405(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        for path in ("/nope", "/keys/a/b/c", "/keys/key_x/delete"):
            status, body, resp = await sc.call("GET", path)
            assert status == 404, path
            assert body["error"] == "not_found"
            assert resp.headers["Cache-Control"] == "no-store"
        async with sc.http.get(sc.admin_origin + "/admin/static/nothing.js") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
        for method, path, allowed in (("PUT", "/keys", "GET, POST"), ("DELETE", "/keys/key_x", "GET, PATCH"),
                                      ("GET", "/keys/key_x/disable", "POST"),
                                      ("PATCH", "/session", "DELETE, GET, POST")):
            status, body, resp = await sc.call(method, path)
            assert status == 405, (method, path)
            assert body["error"] == "method_not_allowed"
            assert resp.headers["Allow"] == allowed
            assert resp.headers["Cache-Control"] == "no-store"


async def test_roles_come_from_the_config(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, _ = await sc.call("GET", "/roles")
    assert status == 200
    assert_matches("RoleList", body)
    assert body["roles"] == [
        {"name": "org-admin", "description": "Access organization settings, including API keys",
         "permissions": ["org:settings"], "tools": None, "rate_limit": None},
        {"name": "viewer", "description": "Read planning data", "permissions": ["plans:read"], "tools": None,
         "rate_limit": None},
        {"name": "writer", "description": "Read and change plans", "permissions": ["plans:read", "plans:write"],
         "tools": None, "rate_limit": None},
    ]


async def test_rotate_makes_a_new_key_with_the_same_roles(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc:
        old = await sc.create_key("agent", ["viewer", "writer"])
        when = _in(1)
        status, rotated, resp = await sc.call("POST", f"/keys/{old['id']}/rotate",
                                              json_body={"name": "agent-2", "disable_old_at": when})
        assert status == 201
        assert_matches("RotatedKey", rotated)
        assert KEY_SHAPE.fullmatch(rotated["key"])
        assert rotated["key"] != old["key"]
        assert rotated["name"] == "agent-2"
        assert rotated["roles"] == ["viewer", "writer"]
        assert rotated["rotated_from"]["id"] == old["id"]
        assert rotated["disable_old_at"] is not None
        assert resp.headers["Location"] == f"/admin/api/keys/{rotated['id']}"
        # Both work until the scheduled time.
        assert await sc.proxy_status(old["key"]) == 200
        assert await sc.proxy_status(rotated["key"]) == 200

        status, body, _ = await sc.call("POST", f"/keys/{old['id']}/rotate", json_body={"name": "agent-2"})
        assert (status, body["error"], body["field"]) == (409, "name_taken", "name")
        status, body, _ = await sc.call("POST", f"/keys/{old['id']}/rotate", json_body={})
        assert (status, body["field"]) == (422, "name")
        status, body, _ = await sc.call("POST", f"/keys/{old['id']}/rotate",
                                        json_body={"name": "agent-3", "disable_old_at": "2001-01-01T00:00:00Z"})
        assert (status, body["field"]) == (422, "disable_old_at")
        _, events, _ = await sc.call("GET", "/audit")
    rotated_rows = [e for e in events["events"] if e["action"] == "key.rotated"]
    assert len(rotated_rows) == 1
    assert rotated_rows[0]["key_id"] == old["id"]
    assert rotated_rows[0]["key_name"] == "agent"
    assert rotated_rows[0]["details"]["new_key_name"] == "agent-2"


# ---- disable means now -----------------------------------------------------------------------


async def test_disabled_key_is_rejected_on_next_request(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        # Warm the verified-key cache: the disable must beat it.
        assert await sc.proxy_status(agent["key"]) == 200
        assert await sc.proxy_status(agent["key"]) == 200
        status, disabled, _ = await sc.call("POST", f"/keys/{agent['id']}/disable")
        assert status == 200
        assert_matches("Key", disabled)
        assert disabled["status"] == "disabled"
        assert disabled["disabled_at"] is not None
        assert await sc.proxy_status(agent["key"]) == 401

        status, enabled, _ = await sc.call("POST", f"/keys/{agent['id']}/enable")
        assert status == 200
        assert enabled["status"] == "enabled"
        assert enabled["disabled_at"] is None
        assert await sc.proxy_status(agent["key"]) == 200
        # Idempotent, and the first disable time is kept when disabling twice.
        _, first, _ = await sc.call("POST", f"/keys/{agent['id']}/disable")
        _, second, _ = await sc.call("POST", f"/keys/{agent['id']}/disable", json_body={})
        assert second["disabled_at"] == first["disabled_at"]
        _, listed, _ = await sc.call("GET", f"/keys/{agent['id']}")
    assert listed["status"] == "disabled"


async def _open_event_stream(sc: AdminSidecar, key: str) -> Any:
    """A 2025-era MCP session through the proxy and its GET SSE stream (left open)."""
    headers = {**sc.bearer(key), **MCP_HEADERS}
    async with sc.http.post(sc.proxy_url + "/mcp", data=json.dumps(initialize_message()), headers=headers) as resp:
        assert resp.status == 200
        session_id = resp.headers["Mcp-Session-Id"]
        await resp.read()
    headers.update({"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL})
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with sc.http.post(sc.proxy_url + "/mcp", data=json.dumps(note), headers=headers) as resp:
        assert resp.status == 202
    stream = await sc.http.get(sc.proxy_url + "/mcp", headers={
        **sc.bearer(key), "Accept": "text/event-stream", "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": PROTOCOL})
    assert stream.status == 200
    assert stream.content_type == "text/event-stream"
    return stream


async def test_disabling_a_key_cuts_its_open_event_stream_within_one_second(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc:
        agent = await sc.create_key("streamer", ["viewer"])
        other = await sc.create_key("bystander", ["viewer"])
        stream = await _open_event_stream(sc, agent["key"])
        other_stream = await _open_event_stream(sc, other["key"])

        async def drain() -> float:
            try:
                async for _ in stream.content.iter_any():
                    pass
            except ClientPayloadError:
                pass  # the proxy closed the connection mid-stream: exactly what a cut looks like
            return time.monotonic()

        reader = asyncio.create_task(drain())
        await asyncio.sleep(0.2)
        assert not reader.done()
        started = time.monotonic()
        status, _, _ = await sc.call("POST", f"/keys/{agent['id']}/disable")
        assert status == 200
        ended = await asyncio.wait_for(reader, timeout=3)
        assert ended - started < 1.0
        assert await sc.proxy_status(agent["key"]) == 401
        # Only that key's streams are cut.
        assert not other_stream.content.at_eof()
        assert await sc.proxy_status(other["key"]) == 200
        stream.close()
        other_stream.close()


# ---- audit -----------------------------------------------------------------------------------


async def test_audit_rows_name_the_key_and_the_actor(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        await sc.call("POST", f"/keys/{agent['id']}/disable")
        await sc.call("POST", f"/keys/{agent['id']}/enable")
        _, rotated, _ = await sc.call("POST", f"/keys/{agent['id']}/rotate", json_body={"name": "agent-next"})
        viewer = await sc.create_key("looker", ["viewer"])
        assert (await sc.login(viewer["key"]))[0] == 403
        assert (await sc.login("tak_" + "A" * 46))[0] == 401
        status, session, cookie = await sc.login()
        assert status == 200
        assert cookie is not None
        status, _, _ = await sc.call("DELETE", "/session", auth=False,
                                     headers={**sc.cookie_header(cookie), **sc.same_origin(session["csrf_token"])})
        assert status == 200
        status, page, _ = await sc.call("GET", "/audit")
    assert status == 200
    assert_matches("AuditList", page)
    events = page["events"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True)  # newest first
    by_action: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_action.setdefault(event["action"], []).append(event)
    ops = sc.admin_key_id

    def one(action: str, key_name: str) -> dict[str, Any]:
        rows = [e for e in by_action[action] if e["key_name"] == key_name]
        assert len(rows) == 1, (action, key_name, by_action.get(action))
        return rows[0]

    created = one("key.created", "agent")
    assert (created["actor"], created["key_id"], created["client"]) == ("ops", agent["id"], "127.0.0.1")
    assert created["details"]["roles"] == ["viewer"]
    assert one("key.created", "ops")["actor"] == "cli"
    for action in ("key.disabled", "key.enabled", "key.rotated"):
        row = one(action, "agent")
        assert (row["actor"], row["key_id"], row["client"]) == ("ops", agent["id"], "127.0.0.1")
    assert one("key.disabled", "agent")["details"]["previous_status"] == "enabled"
    assert one("key.created", "agent-next")["details"]["rotated_from"] == agent["id"]
    assert one("key.created", "agent-next")["key_id"] == rotated["id"]
    login = one("admin.login", "ops")
    assert (login["actor"], login["key_id"], login["client"]) == ("ops", ops, "127.0.0.1")
    logout = one("admin.logout", "ops")
    assert (logout["actor"], logout["key_id"]) == ("ops", ops)
    refused = one("admin.login_failed", "looker")
    assert (refused["actor"], refused["key_id"], refused["details"]["reason"]) == (
        "looker", viewer["id"], "missing_permission")
    anonymous = [e for e in by_action["admin.login_failed"] if e["key_name"] is None]
    assert len(anonymous) == 1
    assert anonymous[0]["actor"] == "anonymous"
    assert anonymous[0]["client"] == "127.0.0.1"
    assert anonymous[0]["details"]["reason"] == "invalid"


async def test_audit_events_are_also_json_log_lines(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        await sc.call("POST", f"/keys/{agent['id']}/disable")
        await sc.login()
        lines = [line for line in sc.log_lines() if line.get("type") == "audit"]
    actions = [(line["action"], line["key_name"], line["actor"]) for line in lines]
    assert ("key.created", "agent", "ops") in actions
    assert ("key.disabled", "agent", "ops") in actions
    assert ("admin.login", "ops", "ops") in actions


async def test_audit_paging_and_parameter_validation(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        for index in range(5):
            await sc.create_key(f"k{index}", ["viewer"])
        _, everything, _ = await sc.call("GET", "/audit")
        assert len(everything["events"]) == 6
        assert everything["next_before"] is None
        _, first, _ = await sc.call("GET", "/audit?limit=4")
        assert [e["id"] for e in first["events"]] == [e["id"] for e in everything["events"][:4]]
        assert first["next_before"] == first["events"][-1]["id"]
        _, rest, _ = await sc.call("GET", f"/audit?limit=4&before={first['next_before']}")
        assert [e["id"] for e in rest["events"]] == [e["id"] for e in everything["events"][4:]]
        assert rest["next_before"] is None
        assert (await sc.call("GET", "/audit?limit=500"))[0] == 200
        for query, field in (("limit=0", "limit"), ("limit=501", "limit"), ("limit=ten", "limit"),
                             ("limit=-1", "limit"), ("before=0", "before"), ("before=x", "before"),
                             ("limit=1.5", "limit")):
            status, body, _ = await sc.call("GET", f"/audit?{query}")
            assert (status, body["error"], body["field"]) == (400, "invalid_parameter", field), query


@pytest.mark.sqlite_only  # reads or locks the SQLite file itself
async def test_no_full_key_in_any_response_audit_row_log_line_or_database_byte(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        _, rotated, _ = await sc.call("POST", f"/keys/{agent['id']}/rotate", json_body={"name": "agent-2"})
        keys = [sc.admin_key, agent["key"], rotated["key"]]
        creations = len(sc.seen_bodies)
        await sc.proxy_status(agent["key"])
        await sc.call("POST", f"/keys/{agent['id']}/disable")
        await sc.proxy_status(agent["key"])
        await sc.call("POST", f"/keys/{agent['id']}/enable")
        status, _, cookie = await sc.login()
        assert status == 200
        assert cookie is not None
        await sc.login(agent["key"][:-1] + "x")
        await sc.call("GET", "/keys")
        await sc.call("GET", "/audit?limit=500")
        await sc.call("GET", f"/keys/{agent['id']}")
        await sc.call("GET", "/session", auth=False, headers=sc.cookie_header(cookie))
        await sc.services.flush()
        later = b"".join(sc.seen_bodies[creations:]) + sc.log.getvalue().encode()
        data_dir = sc.settings.data_dir
        files = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name.startswith("sidecar.db")}
        assert "sidecar.db-wal" in files  # WAL mode: the newest rows live here until a checkpoint
    for key in keys:
        secret = key[12:44].encode()
        assert key.encode() not in later
        assert secret not in later
        for name, content in files.items():
            assert key.encode() not in content, name
            assert secret not in content, name
    assert not KEY_SHAPE.search(later.decode("utf-8", "replace"))


# ---- OpenAPI ---------------------------------------------------------------------------------


async def test_openapi_document_is_valid_and_lists_exactly_the_routes(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, document, _ = await sc.call("GET", "/openapi.json")
        routed = {(route.method.lower(), route.resource.canonical) for route in sc.admin_app.router.routes()
                  if route.resource is not None and route.resource.canonical.startswith("/admin/api/")}
    assert status == 200
    validate(document)
    assert document["openapi"].startswith("3.1")
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described == routed
    assert ("post", "/admin/api/keys/{id}/disable") in routed
    assert document["components"]["securitySchemes"]["sessionCookie"]["name"] == "toolio_admin_session"


# ---- page and headers ------------------------------------------------------------------------


async def test_every_admin_response_is_no_store_with_strict_headers(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        urls = ["/admin/", "/admin/static/admin.js", "/admin/static/admin.css", "/admin/api/keys",
                "/admin/api/nope", "/admin/static/nope"]
        for url in urls:
            async with sc.http.get(sc.admin_origin + url, headers=sc.bearer()) as resp:
                assert resp.headers["Cache-Control"] == "no-store", url
                assert resp.headers["Content-Security-Policy"] == CSP, url
                assert resp.headers["X-Content-Type-Options"] == "nosniff", url
                assert resp.headers["Referrer-Policy"] == "no-referrer", url
                assert resp.headers["X-Frame-Options"] == "DENY", url
                assert "Strict-Transport-Security" not in resp.headers, url
        async with sc.http.get(sc.admin_origin + "/admin/") as resp:
            html = await resp.text()
            assert resp.content_type == "text/html"
        async with sc.http.get(sc.admin_origin + "/admin/static/admin.js") as resp:
            assert resp.content_type == "text/javascript"
        async with sc.http.get(sc.admin_origin + "/admin", allow_redirects=False) as resp:
            assert resp.status in (301, 308)
            assert resp.headers["Location"] == "/admin/"
    # No inline script, style or handler attribute (CSP would refuse them anyway).
    assert "<style" not in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"\sstyle=", html)
    assert "http://" not in html
    assert "https://" not in html


async def test_secure_cookies_use_the_host_prefix_and_hsts(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, admin={"secure_cookies": True}) as sc:
        status, _, resp = await sc.call("POST", "/session", json_body={"key": sc.admin_key}, auth=False)
        assert status == 200
        set_cookie = resp.headers["Set-Cookie"]
        assert set_cookie.startswith("__Host-toolio_admin_session=")
        assert "Secure" in set_cookie
        assert "Path=/;" in set_cookie + ";"
        assert "Domain" not in set_cookie
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        cookie = set_cookie.split(";", 1)[0].split("=", 1)[1]
        status, current, _ = await sc.call("GET", "/session", auth=False, headers=sc.cookie_header(cookie))
    assert status == 200
    assert current["actor"] == "ops"


# ---- sessions --------------------------------------------------------------------------------


async def test_login_sets_a_hardened_session_cookie_and_returns_the_csrf_token(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, resp = await sc.call("POST", "/session", json_body={"key": sc.admin_key}, auth=False)
        assert status == 200
        assert_matches("Session", body)
        assert body["actor"] == "ops"
        assert body["key_id"] == sc.admin_key_id
        assert len(body["csrf_token"]) >= 32
        expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        assert timedelta(minutes=29) < expires - datetime.now(UTC) <= timedelta(minutes=30)
        absolute = datetime.fromisoformat(body["absolute_expires_at"].replace("Z", "+00:00"))
        assert timedelta(hours=11, minutes=59) < absolute - datetime.now(UTC) <= timedelta(hours=12)
        headers = resp.headers.getall("Set-Cookie")
        assert len(headers) == 1
        attributes = [part.strip() for part in headers[0].split(";")]
        name, _, value = attributes[0].partition("=")
        assert name == "toolio_admin_session"
        assert len(value) >= 32
        assert "HttpOnly" in attributes
        assert "SameSite=Strict" in attributes
        assert "Path=/admin" in attributes
        assert "Secure" not in attributes
        assert not any(a.lower().startswith(("max-age", "expires", "domain")) for a in attributes)
        # The session id is not the key, the CSRF token, or anything in the body.
        assert value not in json.dumps(body)
        assert value != sc.admin_key

        status, current, _ = await sc.call("GET", "/session", auth=False, headers=sc.cookie_header(value))
        assert status == 200
        assert current["csrf_token"] == body["csrf_token"]
        # The cookie alone is enough to read.
        status, keys, _ = await sc.call("GET", "/keys", auth=False, headers=sc.cookie_header(value))
        assert status == 200
        assert keys["keys"][0]["name"] == "ops"
        # The page learns it is signed in without a request that could fail.
        async with sc.http.get(sc.admin_origin + "/admin/", headers=sc.cookie_header(value)) as page:
            assert '<meta name="toolio-session" content="active">' in await page.text()
        async with sc.http.get(sc.admin_origin + "/admin/") as page:
            assert '<meta name="toolio-session" content="none">' in await page.text()


@pytest.mark.parametrize(("body", "status", "field"), [
    ({}, 422, "key"), ({"key": ""}, 422, "key"), ({"key": 5}, 422, "key"), ({"key": "x", "user": "a"}, 422, "user"),
])
async def test_login_validation_names_the_field(tmp_path: Path, body: dict[str, Any], status: int,
                                                field: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        got, answer, resp = await sc.call("POST", "/session", json_body=body, auth=False)
    assert (got, answer["field"]) == (status, field)
    assert "Set-Cookie" not in resp.headers


async def test_failed_logins_meet_the_same_rate_limit(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, auth={"failures_per_minute_per_address": 3}) as sc:
        # A key verified before the attack keeps working: the cache is checked before the budget.
        assert (await sc.call("GET", "/keys"))[0] == 200
        statuses = []
        retry_after = None
        for attempt in range(5):
            guess = "tak_" + "ABCDEFGH" + f"{attempt:0>38}"
            status, body, resp = await sc.call("POST", "/session", json_body={"key": guess}, auth=False)
            statuses.append(status)
            if status == 429:
                retry_after = resp.headers["Retry-After"]
                assert body["error"] == "rate_limited"
        _, audit, _ = await sc.call("GET", "/audit")
    assert statuses[:3] == [401, 401, 401]
    assert statuses[3:] == [429, 429]
    assert retry_after is not None
    assert int(retry_after) > 0
    failed = [e for e in audit["events"] if e["action"] == "admin.login_failed"]
    assert len(failed) == 3  # refused attempts past the budget write no rows


async def test_cookie_session_write_needs_csrf_token_and_same_origin(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        target = await sc.create_key("target", ["viewer"])
        status, session, cookie = await sc.login()
        assert status == 200
        assert cookie is not None
        csrf = session["csrf_token"]
        path = f"/keys/{target['id']}/disable"
        jar = sc.cookie_header(cookie)
        evil = "http://127.0.0.1:1"
        attempts: list[tuple[dict[str, str], str]] = [
            ({}, "no token, no origin"),
            ({"Origin": sc.admin_origin, "Sec-Fetch-Site": "same-origin"}, "no token"),
            ({"Origin": sc.admin_origin, "X-CSRF-Token": csrf + "x"}, "wrong token"),
            ({"X-CSRF-Token": csrf}, "token but no Origin / Sec-Fetch-Site"),
            ({"Origin": evil, "X-CSRF-Token": csrf}, "wrong Origin"),
            ({"Origin": "null", "X-CSRF-Token": csrf}, "opaque Origin"),
            ({"Origin": sc.admin_origin, "Sec-Fetch-Site": "cross-site", "X-CSRF-Token": csrf}, "cross-site"),
            ({"Origin": sc.admin_origin, "Sec-Fetch-Site": "same-site", "X-CSRF-Token": csrf}, "same-site"),
            ({"Origin": sc.admin_origin.replace("http:", "https:"), "X-CSRF-Token": csrf}, "other scheme"),
        ]
        for extra, why in attempts:
            status, body, _ = await sc.call("POST", path, auth=False, headers={**jar, **extra})
            assert status == 403, why
            assert body["error"] in ("csrf_failed", "cross_site_request"), why
        _, still, _ = await sc.call("GET", f"/keys/{target['id']}")
        assert still["status"] == "enabled"
        # Reads from another site are refused as well (Fetch Metadata resource isolation).
        status, _, _ = await sc.call("GET", "/keys", auth=False, headers={**jar, "Sec-Fetch-Site": "cross-site"})
        assert status == 403

        status, changed, _ = await sc.call("POST", path, auth=False, headers={**jar, **sc.same_origin(csrf)})
        assert status == 200
        assert changed["status"] == "disabled"
        status, _, _ = await sc.call("POST", f"/keys/{target['id']}/enable", auth=False,
                                     headers={**jar, "Origin": sc.admin_origin, "X-CSRF-Token": csrf})
        assert status == 200
        # A bearer key needs no CSRF token: there is no ambient credential to abuse.
        assert (await sc.call("POST", path))[0] == 200
        status, created, _ = await sc.call("POST", "/keys", auth=False, headers={**jar, **sc.same_origin(csrf)},
                                           json_body={"name": "from-page", "roles": ["viewer"]})
        assert status == 201
        assert created["created_by"] == "ops"


async def test_cross_site_login_is_refused(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, cookie = await sc.login(headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert body["error"] == "cross_site_request"
    assert cookie is None


async def test_logout_ends_the_session(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        _, session, cookie = await sc.login()
        assert cookie is not None
        jar = sc.cookie_header(cookie)
        status, _, _ = await sc.call("DELETE", "/session", auth=False, headers=jar)
        assert status == 403  # logout is a write: it needs the CSRF token too
        status, body, resp = await sc.call("DELETE", "/session", auth=False,
                                           headers={**jar, **sc.same_origin(session["csrf_token"])})
        assert status == 200
        assert body == {"logged_out": True}
        cleared = resp.headers["Set-Cookie"]
        assert cleared.startswith("toolio_admin_session=")
        assert "Max-Age=0" in cleared
        for method, path in (("GET", "/session"), ("GET", "/keys")):
            status, body, _ = await sc.call(method, path, auth=False, headers=jar)
            assert status == 401, path
        status, _, _ = await sc.call("POST", "/keys", auth=False, json_body={"name": "late", "roles": ["viewer"]},
                                     headers={**jar, **sc.same_origin(session["csrf_token"])})
        assert status == 401


async def test_every_login_gets_a_new_session_id(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        _, first, one = await sc.login()
        assert one is not None
        status, second, two = await sc.call("POST", "/session", json_body={"key": sc.admin_key}, auth=False,
                                            headers=sc.cookie_header(one))
        assert status == 200
        new = session_cookie(two).value
        assert new != one
        assert second["csrf_token"] != first["csrf_token"]
        # The session this browser had before logging in again is gone (no fixation).
        assert (await sc.call("GET", "/session", auth=False, headers=sc.cookie_header(one)))[0] == 401
        assert (await sc.call("GET", "/session", auth=False, headers=sc.cookie_header(new)))[0] == 200
        assert (await sc.call("GET", "/session", auth=False, headers=sc.cookie_header("forged")))[0] == 401


async def test_session_ends_when_its_admin_key_is_disabled(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        other = await sc.create_key("ops-b", ["org-admin"])
        _, _, cookie = await sc.login(other["key"])
        assert cookie is not None
        assert (await sc.call("GET", "/keys", auth=False, headers=sc.cookie_header(cookie)))[0] == 200
        await sc.call("POST", f"/keys/{other['id']}/disable")
        status, _, _ = await sc.call("GET", "/keys", auth=False, headers=sc.cookie_header(cookie))
        assert status == 401
        await sc.call("POST", f"/keys/{other['id']}/enable")
        # Enabling the key again does not revive the session.
        assert (await sc.call("GET", "/keys", auth=False, headers=sc.cookie_header(cookie)))[0] == 401


async def test_session_expires_after_the_idle_timeout(tmp_path: Path) -> None:
    # Each pause is 60% of the idle timeout: a busy machine may stretch it by 0.8 s, and two of
    # them in a row still outlast the timeout, which only the refresh on use survives.
    async with admin_sidecar(tmp_path, admin={"session_idle_timeout_seconds": 2}) as sc:
        _, _, cookie = await sc.login()
        assert cookie is not None
        jar = sc.cookie_header(cookie)
        await asyncio.sleep(1.2)
        assert (await sc.call("GET", "/session", auth=False, headers=jar))[0] == 200  # use refreshes it
        await asyncio.sleep(1.2)
        assert (await sc.call("GET", "/keys", auth=False, headers=jar))[0] == 200
        await asyncio.sleep(2.2)
        status, body, _ = await sc.call("GET", "/keys", auth=False, headers=jar)
    assert status == 401
    assert body["error"] == "unauthorized"


async def test_session_expires_at_the_absolute_timeout_even_when_used(tmp_path: Path) -> None:
    # Used every second, still ended at 3 s: the uses leave a 1 s margin for a busy machine.
    admin = {"session_idle_timeout_seconds": 10, "session_absolute_timeout_seconds": 3}
    async with admin_sidecar(tmp_path, admin=admin) as sc:
        _, session, cookie = await sc.login()
        assert cookie is not None
        jar = sc.cookie_header(cookie)
        expires = datetime.fromisoformat(session["expires_at"].replace("Z", "+00:00"))
        assert expires - datetime.now(UTC) <= timedelta(seconds=3)
        for _ in range(2):
            await asyncio.sleep(1.0)
            assert (await sc.call("GET", "/keys", auth=False, headers=jar))[0] == 200
        await asyncio.sleep(1.1)
        status, _, _ = await sc.call("GET", "/keys", auth=False, headers=jar)
    assert status == 401


# ---- malformed input is a 4xx naming the field, never a 500 ------------------------------------

JSON_TYPE = {"Content-Type": "application/json"}


def _no_500_logged(sc: AdminSidecar) -> None:
    # The admin middleware turns any unexpected exception into a 500 and logs it.
    assert [line for line in sc.log_lines() if line.get("message") == "admin request failed"] == []


async def test_query_integers_are_ascii_digits_only(tmp_path: Path) -> None:
    # str.isdigit() is true for "²" (int() then raises) and for "١٢" (int() reads 12).
    async with admin_sidecar(tmp_path) as sc:
        for name in ("limit", "before"):
            # superscript two, Arabic-Indic 12, fullwidth 1, Persian 3, 1 + superscript two,
            # Arabic-Indic 0, mathematical bold 9
            for value in ("\u00b2", "\u0661\u0662", "\uff11", "\u06f3", "1\u00b2", "\u0660", "\U0001d7d7"):
                status, body, resp = await sc.call("GET", f"/audit?{name}={quote(value)}")
                assert status == 400, (name, value, body)
                assert (body["error"], body["field"]) == ("invalid_parameter", name)
                assert resp.content_type == "application/json"
        assert (await sc.call("GET", "/audit?limit=12&before=999999999999999999"))[0] == 200
        _no_500_logged(sc)


DEEP_BODIES = {
    "arrays": b"[" * 30_000 + b"]" * 30_000,
    "objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "inside a member": b'{"name": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    "just deep enough": b"[" * 1_100 + b"]" * 1_100,
}


@pytest.mark.parametrize("path", ["/session", "/keys", "/keys/{id}/rotate", "/keys/{id}/disable",
                                  "/keys/{id}/enable"])
async def test_deeply_nested_json_is_400_invalid_json(tmp_path: Path, path: str) -> None:
    # json.loads recurses per level: a body of brackets well inside 64 KiB reached RecursionError.
    # The login endpoint parses its body before any key is checked.
    async with admin_sidecar(tmp_path) as sc:
        url = path.format(id=sc.admin_key_id)
        for label, data in DEEP_BODIES.items():
            status, body, _ = await sc.call("POST", url, data=data, headers=JSON_TYPE, auth=path != "/session")
            assert (status, body["error"]) == (400, "invalid_json"), label
        # 100,000 deep is over the body bound: refused before it is parsed.
        status, body, _ = await sc.call("POST", url, data=b"[" * 100_000 + b"]" * 100_000, headers=JSON_TYPE,
                                        auth=path != "/session")
        assert (status, body["error"]) == (413, "body_too_large")
        _, me, _ = await sc.call("GET", f"/keys/{sc.admin_key_id}")
        assert me["status"] == "enabled"
        _no_500_logged(sc)


BAD_TIMES: list[Any] = [
    # Valid RFC 3339, but outside datetime's years 1-9999 once converted to UTC (OverflowError).
    "9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-00:01", "0001-01-01T00:00:00+01:00",
    # In range but in the past.
    "0001-01-01T00:00:00Z", "0001-01-01T00:00:00-23:59", "1970-01-01T00:00:00Z",
    # Not the shape: five-digit or signed years, other scripts' digits, no zone.
    "+10000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "\u0662\u0669\u0669\u0669-01-01T00:00:00Z",
    "\uff12\uff19\uff19\uff19-01-01T00:00:00Z",
    "2999-01-01T00:00:00", "",
    # The shape, but no such time.
    "2999-12-31T23:59:60Z", "2999-02-30T00:00:00Z", "2999-01-01T24:00:00Z", "2999-01-01T00:00:00+24:00",
    # Not strings.
    0, 32503680000, 1.5, float("nan"), float("inf"), True, False, [], ["2999-01-01T00:00:00Z"], {"at": 1},
]


async def test_every_bad_expiry_is_422_naming_the_field_on_create_and_on_rotate(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        old = await sc.create_key("old", ["viewer"])
        for value in BAD_TIMES:
            status, body, _ = await sc.call("POST", "/keys", json_body={"name": "new", "roles": ["viewer"],
                                                                        "expires_at": value})
            assert (status, body["error"], body["field"]) == (422, "invalid_time", "expires_at"), (value, body)
            assert_matches("Error", body)
            status, body, _ = await sc.call("POST", f"/keys/{old['id']}/rotate",
                                            json_body={"name": "new", "disable_old_at": value})
            assert (status, body["error"], body["field"]) == (422, "invalid_time", "disable_old_at"), (value, body)
        _, listed, _ = await sc.call("GET", "/keys")
        assert [k["name"] for k in listed["keys"]] == ["ops", "old"]
        _no_500_logged(sc)


async def test_expiry_at_the_top_of_the_range_and_long_fractions_are_accepted(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        for name, value, stored in [
            ("last", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.000Z"),
            ("last-east", "9999-12-31T23:59:59+23:59", "9999-12-31T00:00:59.000Z"),
            ("nanos", "9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999Z"),
            ("long", "2999-01-01T00:00:00." + "9" * 2000 + "Z", "2999-01-01T00:00:00.999Z"),
            ("lower", "2999-01-01t00:00:00z", "2999-01-01T00:00:00.000Z"),
        ]:
            status, created, _ = await sc.call("POST", "/keys", json_body={"name": name, "roles": ["viewer"],
                                                                           "expires_at": value})
            assert status == 201, (value, created)
            assert created["expires_at"] == stored
            assert await sc.proxy_status(created["key"]) != 401  # not taken for expired
        _no_500_logged(sc)


async def test_a_login_key_with_lone_surrogates_is_a_failed_login(tmp_path: Path) -> None:
    # JSON "\ud800" escapes decode to lone surrogates, which have no UTF-8 form.
    async with admin_sidecar(tmp_path) as sc:
        for data in (b'{"key": "\\ud800"}', b'{"key": "tak_\\udfff\\ud800' + b"A" * 44 + b'"}',
                     b'{"key": "\\udcff"}'):
            status, body, resp = await sc.call("POST", "/session", data=data, headers=JSON_TYPE, auth=False)
            assert (status, body["error"], body["field"]) == (401, "invalid_key", "key"), data
            assert "Set-Cookie" not in resp.headers
        _, audit, _ = await sc.call("GET", "/audit")
        failed = [e for e in audit["events"] if e["action"] == "admin.login_failed"]
        assert len(failed) == 3
        _no_500_logged(sc)


@pytest.mark.parametrize("origin", ["http://[::1", "http://]", "https://[zz]", "http://a]b"])
async def test_an_unparsable_origin_is_cross_site(tmp_path: Path, origin: str) -> None:
    # urlsplit raises ValueError on a broken IPv6 literal; that must not become a 500, neither
    # on the unauthenticated login nor on a cookie-authenticated write.
    async with admin_sidecar(tmp_path) as sc:
        status, body, cookie = await sc.login(headers={"Origin": origin})
        assert (status, body["error"]) == (403, "cross_site_request")
        assert cookie is None
        _, session, cookie = await sc.login()
        assert cookie is not None
        status, body, _ = await sc.call("POST", "/keys", auth=False, json_body={"name": "x", "roles": ["viewer"]},
                                        headers={**sc.cookie_header(cookie), "Origin": origin,
                                                 "X-CSRF-Token": session["csrf_token"]})
        assert (status, body["error"]) == (403, "cross_site_request")
        _no_500_logged(sc)
