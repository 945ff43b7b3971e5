"""A key's own rate limit through the admin API (docs/reference/admin-api.md, docs/reference/limits.md):
``rate_limit`` on create, ``PATCH /admin/api/keys/{id}``, the roles' limits in ``GET /roles``, and a
running sidecar holding the key's next request to the new limit. On both stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.gate.principal import Principal
from sidecar.keys.format import key_digest, lookup_id_of
from sidecar.settings import RateLimit
from tests.support.admin import MCP_HEADERS, AdminSidecar, admin_sidecar, assert_matches, initialize_message
from tests.support.harness import RunningSidecar, running_sidecar
from tests.support.polling import eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("both_stores")]

ROLE_LIMITS: dict[str, Any] = {"viewer": {"rate_limit": "600/minute"}, "writer": {"rate_limit": "20/second"}}


def _cached(sc: AdminSidecar, key: str) -> Principal | None:
    """The principal the running proxy holds for ``key`` in its verified-key cache, if any."""
    return sc.services.cache.get(lookup_id_of(key), key_digest(key))


async def test_create_with_a_limit_and_every_representation_shows_it(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, roles=ROLE_LIMITS) as sc:
        status, created, _ = await sc.call("POST", "/keys", json_body={
            "name": "agent", "roles": ["viewer"], "rate_limit": "100/second"})
        assert status == 201, created
        assert_matches("NewKey", created)
        assert (created["rate_limit"], created["effective_rate_limit"], created["rate_limit_source"]) == (
            "100/second", "100/second", "key")
        status, plain, _ = await sc.call("POST", "/keys", json_body={
            "name": "plain", "roles": ["viewer", "writer"], "rate_limit": None})
        assert status == 201, plain
        # The most generous of its roles': 20/second beats 600/minute (10/second).
        assert (plain["rate_limit"], plain["effective_rate_limit"], plain["rate_limit_source"]) == (
            None, "20/second", "roles")
        _, one, _ = await sc.call("GET", f"/keys/{created['id']}")
        _, listed, _ = await sc.call("GET", "/keys")
        status, rotated, _ = await sc.call("POST", f"/keys/{created['id']}/rotate", json_body={"name": "agent-2"})
        assert_matches("RotatedKey", rotated)
    assert one["rate_limit"] == "100/second"
    assert {k["name"]: k["rate_limit"] for k in listed["keys"]} == {"ops": None, "agent": "100/second",
                                                                   "plain": None}
    assert (status, rotated["rate_limit"], rotated["rotated_from"]["rate_limit"]) == (201, "100/second",
                                                                                       "100/second")


async def test_roles_list_their_rate_limits(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, roles=ROLE_LIMITS) as sc:
        status, body, _ = await sc.call("GET", "/roles")
    assert status == 200
    assert_matches("RoleList", body)
    assert {r["name"]: r["rate_limit"] for r in body["roles"]} == {
        "org-admin": None, "viewer": "600/minute", "writer": "20/second"}


async def test_patch_changes_the_limit_and_writes_a_key_updated_event(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, roles=ROLE_LIMITS) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        answers = []
        for value in ("5/second", "unlimited", None):
            status, body, _ = await sc.call("PATCH", f"/keys/{agent['id']}", json_body={"rate_limit": value},
                                            headers={"Content-Type": "application/merge-patch+json"})
            assert status == 200, body
            assert_matches("Key", body)
            answers.append((body["rate_limit"], body["effective_rate_limit"], body["rate_limit_source"]))
        _, audit, _ = await sc.call("GET", f"/audit?action=key.updated&key_id={agent['id']}")
    assert answers == [("5/second", "5/second", "key"), ("unlimited", "unlimited", "key"),
                       (None, "600/minute", "roles")]
    assert [(e["actor"], e["key_name"], e["details"]) for e in audit["events"]] == [
        ("ops", "agent", {"rate_limit": {"from": "unlimited", "to": None}}),
        ("ops", "agent", {"rate_limit": {"from": "5/second", "to": "unlimited"}}),
        ("ops", "agent", {"rate_limit": {"from": None, "to": "5/second"}}),
    ]


@pytest.mark.parametrize(("body", "error", "field"), [
    ({"rate_limit": "0/second"}, "invalid_rate_limit", "rate_limit"),
    ({"rate_limit": "5/day"}, "invalid_rate_limit", "rate_limit"),
    ({"rate_limit": 5}, "invalid_rate_limit", "rate_limit"),
    ({"rate_limit": "roles"}, "invalid_rate_limit", "rate_limit"),
    ({"rate_limit": "5/second", "name": "renamed"}, "unknown_field", "name"),
    ({"status": "disabled"}, "unknown_field", "status"),
    ({}, "missing_field", "rate_limit"),
])
async def test_a_bad_patch_is_422_naming_the_field_and_changes_nothing(tmp_path: Path, body: dict[str, Any],
                                                                      error: str, field: str) -> None:
    async with admin_sidecar(tmp_path, roles=ROLE_LIMITS) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        status, answer, _ = await sc.call("PATCH", f"/keys/{agent['id']}", json_body=body)
        _, after, _ = await sc.call("GET", f"/keys/{agent['id']}")
        _, audit, _ = await sc.call("GET", "/audit?action=key.updated")
    assert (status, answer["error"], answer["field"]) == (422, error, field)
    assert_matches("Error", answer)
    assert after == {k: v for k, v in agent.items() if k != "key"}
    assert audit["events"] == []


async def test_a_bad_create_limit_is_422_naming_the_field(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, answer, _ = await sc.call("POST", "/keys", json_body={
            "name": "agent", "roles": ["viewer"], "rate_limit": "fast"})
        _, listed, _ = await sc.call("GET", "/keys")
    assert (status, answer["error"], answer["field"]) == (422, "invalid_rate_limit", "rate_limit")
    assert "N/second" in answer["message"]
    assert [k["name"] for k in listed["keys"]] == ["ops"]


async def test_patching_an_unknown_key_is_404(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        status, answer, _ = await sc.call("PATCH", "/keys/key_0000000000000000", json_body={"rate_limit": "1/second"})
    assert (status, answer["error"]) == (404, "not_found")


async def test_patch_needs_the_admin_permission_and_a_key(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        viewer = await sc.create_key("reader", ["viewer"])
        anonymous, _, _ = await sc.call("PATCH", f"/keys/{viewer['id']}", auth=False,
                                        json_body={"rate_limit": "1/second"})
        forbidden, _, _ = await sc.call("PATCH", f"/keys/{viewer['id']}", key=viewer["key"],
                                        json_body={"rate_limit": "unlimited"})
        _, after, _ = await sc.call("GET", f"/keys/{viewer['id']}")
    assert (anonymous, forbidden, after["rate_limit"]) == (401, 403, None)


async def test_patch_through_a_session_needs_the_csrf_token(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        _, session, cookie = await sc.login()
        assert cookie is not None
        without, _, _ = await sc.call("PATCH", f"/keys/{agent['id']}", auth=False, json_body={"rate_limit": "1/hour"},
                                      headers={**sc.cookie_header(cookie), **sc.same_origin(None)})
        status, body, _ = await sc.call("PATCH", f"/keys/{agent['id']}", auth=False,
                                        json_body={"rate_limit": "1/hour"},
                                        headers={**sc.cookie_header(cookie), **sc.same_origin(session["csrf_token"])})
    assert without == 403
    assert (status, body["rate_limit"]) == (200, "1/hour")


async def test_another_workspaces_key_cannot_be_patched(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path, workspaces={"from_host": "{workspace}.toolio.test"}) as sc:
        other, _ = await sc.services.keys.create(name="globex-agent", roles=["viewer"], actor="cli", client=None,
                                                 workspace="globex")
        status, answer, _ = await sc.call("PATCH", f"/keys/{other.id}", json_body={"rate_limit": "1/second"})
        # Judged after the 404: a foreign key is not found, whatever the body says.
        bad_body, _, _ = await sc.call("PATCH", f"/keys/{other.id}", json_body={"owner": "me"})
        mine = await sc.create_key("acme-agent", ["viewer"])
        ok, body, _ = await sc.call("PATCH", f"/keys/{mine['id']}", json_body={"rate_limit": "1/second"})
        stored = await sc.services.store.get_key(other.id)
    assert (status, answer["error"], bad_body) == (404, "not_found", 404)
    assert (ok, body["rate_limit"], body["workspace"]) == (200, "1/second", "acme")
    assert stored is not None and stored.rate_limit is None


async def test_a_patch_makes_the_running_proxy_hold_the_key_to_the_new_limit(tmp_path: Path) -> None:
    """The cached principal is forgotten on PATCH, and the key's next request is verified again
    with the new limit (docs/reference/limits.md: no restart, no cache delay)."""
    async with admin_sidecar(tmp_path, roles=ROLE_LIMITS, upstream=True) as sc:
        agent = await sc.create_key("agent", ["viewer"])
        assert await sc.proxy_status(agent["key"]) == 200
        cached = _cached(sc, agent["key"])
        assert cached is not None and cached.rate_limit == RateLimit(600, "minute")

        status, _, _ = await sc.call("PATCH", f"/keys/{agent['id']}", json_body={"rate_limit": "3/second"})
        assert status == 200
        assert _cached(sc, agent["key"]) is None
        assert await sc.proxy_status(agent["key"]) == 200
        cached = _cached(sc, agent["key"])
        assert cached is not None and cached.rate_limit == RateLimit(3, "second")

        await sc.call("PATCH", f"/keys/{agent['id']}", json_body={"rate_limit": "unlimited"})
        assert await sc.proxy_status(agent["key"]) == 200
        cached = _cached(sc, agent["key"])
        assert cached is not None and cached.rate_limit is None

        await sc.call("PATCH", f"/keys/{agent['id']}", json_body={"rate_limit": None})
        assert await sc.proxy_status(agent["key"]) == 200
        cached = _cached(sc, agent["key"])
        assert cached is not None and cached.rate_limit == RateLimit(600, "minute")


async def test_another_replica_on_the_same_store_picks_up_the_new_limit(tmp_path: Path) -> None:
    """A second sidecar sharing the store (the same SQLite file, polled; or PostgreSQL, told by
    its change feed) forgets its cached principal and verifies the key again with the new limit."""
    async with (admin_sidecar(tmp_path, roles=ROLE_LIMITS, upstream=True, auth={"store_poll_seconds": 0.1}) as sc,
                running_sidecar(sc.settings) as other, aiohttp.ClientSession() as http):
        agent = await sc.create_key("agent", ["viewer"])

        async def through_other() -> int:
            async with http.post(other.proxy_url + "/mcp", data=json.dumps(initialize_message()),
                                 headers={**sc.bearer(agent["key"]), **MCP_HEADERS}) as resp:
                await resp.read()
                return resp.status

        def held(replica: RunningSidecar) -> Principal | None:
            return replica.services.cache.get(lookup_id_of(agent["key"]), key_digest(agent["key"]))

        assert await through_other() == 200
        cached = held(other)
        assert cached is not None and cached.rate_limit == RateLimit(600, "minute")
        status, _, _ = await sc.call("PATCH", f"/keys/{agent['id']}", json_body={"rate_limit": "3/second"})
        assert status == 200
        await eventually(lambda: held(other) is None, what="the other replica forgets the key")
        assert await through_other() == 200
        cached = held(other)
        assert cached is not None and cached.rate_limit == RateLimit(3, "second")
