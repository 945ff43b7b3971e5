"""The activity audit in the admin API (docs/reference/admin-api.md): ``GET /admin/api/audit``
filtered by ``action`` and ``key_id``, ``GET /admin/api/keys/{id}/activity`` (a key's recent tool
calls and calls per tool in the last 24 hours) and the roles' tool patterns. On both stores.

``tool.called`` events are made with the running sidecar's own recorder (what the proxy calls
for each ``tools/call``) and written by its flush, or written through the store when they must be
older than the recorder would make them.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from sidecar.keys.records import AuditRecord, utcnow
from tests.support.admin import AdminSidecar, admin_sidecar, assert_matches
from tests.support.records import key_record

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("both_stores")]


async def record_calls(sc: AdminSidecar, key: dict[str, Any], calls: list[tuple[str, str]]) -> None:
    """``tool.called`` events for ``key``, in order, through the sidecar's recorder; written now."""
    for tool, outcome in calls:
        sc.services.activity.tool_called(key_id=key["id"], key_name=key["name"], tool=tool, outcome=outcome,
                                         client="192.0.2.10")
    await sc.services.activity.flush()


async def audit(sc: AdminSidecar, query: str) -> dict[str, Any]:
    status, body, _ = await sc.call("GET", f"/audit?{query}")
    assert status == 200, body
    assert_matches("AuditList", body)
    assert isinstance(body, dict)
    return body


def shape(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(e["action"], e["key_name"]) for e in body["events"]]


async def test_audit_filters_by_action_and_key_id_combined(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        a = await sc.create_key("agent-a", ["viewer"])
        b = await sc.create_key("agent-b", ["viewer"])
        await record_calls(sc, a, [("get_plan", "allowed"), ("delete_plan", "denied")])
        await record_calls(sc, b, [("get_plan", "allowed")])
        await sc.call("POST", f"/keys/{a['id']}/disable")

        calls = await audit(sc, "action=tool.called")
        assert shape(calls) == [("tool.called", "agent-b"), ("tool.called", "agent-a"), ("tool.called", "agent-a")]
        event = calls["events"][-1]
        assert (event["actor"], event["key_id"], event["client"], event["details"]) == (
            "agent-a", a["id"], "192.0.2.10", {"tool": "get_plan", "outcome": "allowed"})
        assert shape(await audit(sc, f"key_id={a['id']}")) == [
            ("key.disabled", "agent-a"), ("tool.called", "agent-a"), ("tool.called", "agent-a"),
            ("key.created", "agent-a")]
        both = await audit(sc, f"action=tool.called&key_id={a['id']}")
        assert [e["details"]["tool"] for e in both["events"]] == ["delete_plan", "get_plan"]
        # Paging keeps the filters.
        first = await audit(sc, f"action=tool.called&key_id={a['id']}&limit=1")
        assert first["next_before"] == first["events"][0]["id"]
        rest = await audit(sc, f"action=tool.called&key_id={a['id']}&before={first['next_before']}")
        assert first["events"] + rest["events"] == both["events"]
        assert rest["next_before"] is None
        # Empty values filter nothing; a filter that matches nothing is an empty page.
        assert len((await audit(sc, "action=&key_id="))["events"]) == len((await audit(sc, ""))["events"])
        assert (await audit(sc, "action=key.rotated"))["events"] == []
        assert (await audit(sc, "key_id=key_NoSuchKey0000000"))["events"] == []


@pytest.mark.parametrize(("query", "field"), [
    ("action=Tool.Called", "action"), ("action=tool-called", "action"), ("action=tool%20called", "action"),
    ("action=" + "a" * 65, "action"), ("action=t%C3%BCl", "action"), ("action=tool.called%0A", "action"),
    ("key_id=key%20x", "key_id"), ("key_id=" + "k" * 129, "key_id"), ("key_id=key%2F1", "key_id"),
    ("key_id=" + quote("ключ"), "key_id"), ("key_id=key_1%27--", "key_id"),
])
async def test_a_bad_audit_filter_is_a_400_naming_it(tmp_path: Path, query: str, field: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, body, _ = await sc.call("GET", f"/audit?{query}")
    assert (status, body["error"], body["field"]) == (400, "invalid_parameter", field)
    assert field in body["message"]


async def test_key_activity_lists_the_last_fifty_calls_and_calls_per_tool_in_the_last_day(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        a = await sc.create_key("agent-a", ["viewer"])
        b = await sc.create_key("agent-b", ["viewer"])
        # A day and more ago: in neither the 24 h counts nor (being the oldest) the last 50.
        old = utcnow() - timedelta(hours=30)
        await sc.services.store.append_audit([AuditRecord(
            time=old, action="tool.called", actor="agent-a", workspace="acme", key_id=a["id"], key_name="agent-a",
            client="192.0.2.10", details={"tool": "get_plan", "outcome": "allowed"})])
        await record_calls(sc, a, [("get_plan", "allowed"), ("get_plan", "allowed"), ("delete_plan", "denied")] * 15)
        await record_calls(sc, a, [("search_plans", "allowed"), ("get_plan", "denied")] * 5)
        await record_calls(sc, b, [("get_plan", "allowed")] * 3)
        await sc.call("POST", f"/keys/{a['id']}/disable")  # not a tool call: not in the activity
        status, body, _ = await sc.call("GET", f"/keys/{a['id']}/activity")
    assert status == 200
    assert_matches("KeyActivity", body)
    assert body["key_id"] == a["id"]
    recent = body["recent"]
    assert len(recent) == 50
    assert {(e["action"], e["key_id"]) for e in recent} == {("tool.called", a["id"])}
    ids = [e["id"] for e in recent]
    assert ids == sorted(ids, reverse=True)
    assert (recent[0]["details"], recent[0]["client"]) == ({"tool": "get_plan", "outcome": "denied"}, "192.0.2.10")
    assert body["tools_24h"] == [
        {"tool": "get_plan", "allowed": 30, "denied": 5},
        {"tool": "delete_plan", "allowed": 0, "denied": 15},
        {"tool": "search_plans", "allowed": 5, "denied": 0},
    ]


async def test_a_key_without_calls_has_empty_activity(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        quiet = await sc.create_key("quiet", ["viewer"])
        status, body, _ = await sc.call("GET", f"/keys/{quiet['id']}/activity")
    assert (status, body) == (200, {"key_id": quiet["id"], "recent": [], "tools_24h": []})


async def test_activity_of_an_unknown_or_another_workspaces_key_is_a_json_404(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        foreign = await sc.services.store.insert_key(key_record(7, workspace="globex"), [])
        await sc.services.store.append_audit([AuditRecord(
            time=utcnow(), action="tool.called", actor=foreign.name, workspace="globex", key_id=foreign.id,
            key_name=foreign.name, client="192.0.2.10", details={"tool": "secret_tool", "outcome": "allowed"})])
        for key_id in (foreign.id, "key_NoSuchKey0000000", "not a key"):
            status, body, resp = await sc.call("GET", f"/keys/{quote(key_id)}/activity")
            assert (status, body["error"]) == (404, "not_found"), key_id
            assert resp.content_type == "application/json"
            assert "secret_tool" not in str(body)
        # Nor do another workspace's events show through the audit filters.
        assert (await audit(sc, f"key_id={foreign.id}"))["events"] == []
        assert (await audit(sc, "action=tool.called"))["events"] == []


async def test_key_activity_needs_an_admin(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        status, body, _ = await sc.call("GET", f"/keys/{agent['id']}/activity", auth=False)
        assert (status, body["error"]) == (401, "unauthorized")
        status, body, _ = await sc.call("GET", f"/keys/{agent['id']}/activity", key=agent["key"])
        assert (status, body["error"]) == (403, "forbidden")


async def test_roles_show_their_tool_patterns(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, roles={"viewer": {"tools": ["get_*", "search_plans"]},
                                              "writer": {"tools": []}}) as sc:
        status, body, _ = await sc.call("GET", "/roles")
    assert status == 200
    assert_matches("RoleList", body)
    tools = {role["name"]: role["tools"] for role in body["roles"]}
    # null: every tool; []: none.
    assert tools == {"viewer": ["get_*", "search_plans"], "writer": [], "org-admin": None}
