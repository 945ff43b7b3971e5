"""``GET /admin/api/keys`` at scale (docs/reference/admin-api.md, Listing keys), over real TCP on
both stores: cursor paging through every key in each order, filters, and a 400 naming the
parameter for every bad value. Keys are put straight into the store (no argon2 per key)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from sidecar.keys.records import DISABLED
from tests.support.admin import AdminSidecar, admin_sidecar, assert_matches
from tests.support.records import key_record

# Before the admin key "ops", which the sidecar creates now.
PAST = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("both_stores")]


async def add_keys(sc: AdminSidecar, count: int) -> None:
    records = [replace(key_record(n, name=f"svc-{n:03d}"), created_at=PAST + timedelta(seconds=n // 2),
                       status=DISABLED if n % 4 == 0 else "enabled",
                       roles=("viewer", "writer") if n % 3 == 0 else ("viewer",),
                       last_used_at=PAST + timedelta(days=1, seconds=(7 * n) % 13) if n % 2 else None)
               for n in range(1, count + 1)]
    await sc.services.store.import_records(records, [])


async def every_page(sc: AdminSidecar, **params: Any) -> tuple[list[dict[str, Any]], int]:
    keys: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    while True:
        query = urlencode({**params, **({"cursor": cursor} if cursor else {})})
        status, body, _ = await sc.call("GET", f"/keys?{query}")
        assert status == 200, body
        assert_matches("KeyList", body)
        pages += 1
        keys.extend(body["keys"])
        cursor = body["next_cursor"]
        if cursor is None:
            return keys, pages


async def test_keys_come_a_page_at_a_time_with_a_cursor_to_the_next(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        await add_keys(sc, 250)
        status, body, _ = await sc.call("GET", "/keys")
        assert status == 200
        # Default: 100 keys, oldest first (the admin key "ops" was made last).
        assert len(body["keys"]) == 100
        assert [k["name"] for k in body["keys"][:2]] == ["svc-001", "svc-002"]
        assert isinstance(body["next_cursor"], str)
        keys, pages = await every_page(sc, limit=60)
        assert pages == 5
        assert [k["name"] for k in keys] == [f"svc-{n:03d}" for n in range(1, 251)] + ["ops"]
        _, everything, _ = await sc.call("GET", "/keys?limit=1000")
        assert len(everything["keys"]) == 251
        assert everything["next_cursor"] is None


@pytest.mark.parametrize("sort", ["name", "-name", "created", "-created", "last_used", "-last_used"])
async def test_every_sort_pages_through_every_key_in_order(tmp_path: Path, sort: str) -> None:
    async with admin_sidecar(tmp_path) as sc:
        await add_keys(sc, 23)
        # q=svc leaves out "ops": the admin key is in use, so its last use moves while paging.
        keys, pages = await every_page(sc, sort=sort, limit=5, q="svc")
    assert pages == 5
    assert len({k["id"] for k in keys}) == 23
    field = {"name": "name", "created": "created_at", "last_used": "last_used_at"}[sort.lstrip("-")]
    # RFC 3339 UTC strings of one precision sort as their times do; "" stands for never used.
    values = [(k[field] or "", k["id"]) if field != "name" else (k["name"],) for k in keys]
    assert values == sorted(values, reverse=sort.startswith("-"))


async def test_search_status_and_role_filter_the_list(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        await add_keys(sc, 40)

        async def names(**params: Any) -> list[str]:
            keys, _ = await every_page(sc, sort="name", limit=7, **params)
            return [k["name"] for k in keys]

        assert await names(q="SVC-01") == [f"svc-{n:03d}" for n in range(10, 20)]
        assert await names(q="c-00") == [f"svc-{n:03d}" for n in range(1, 10)]
        assert await names(status="disabled") == [f"svc-{n:03d}" for n in range(4, 41, 4)]
        assert await names(role="writer") == [f"svc-{n:03d}" for n in range(3, 41, 3)]
        assert await names(role="org-admin") == ["ops"]
        assert await names(role="writer", status="disabled", q="svc-01") == ["svc-012"]
        # Text no name can contain matches nothing; it is not an error.
        for impossible in ("svc 1", "svc%", "ü", "'; drop table keys; --", "x" * 100):
            assert await names(q=impossible) == []


async def test_bad_list_parameters_are_400_naming_the_parameter(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        await add_keys(sc, 3)
        _, first, _ = await sc.call("GET", "/keys?sort=name&limit=1")
        by_name = first["next_cursor"]
        cases = [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"), ("limit=-1", "limit"),
                 (f"limit={quote(chr(0x661))}", "limit"), ("limit=1.5", "limit"), ("status=active", "status"),
                 ("role=root", "role"), ("sort=id", "sort"), ("sort=%2Bname", "sort"), ("cursor=abc", "cursor"),
                 (f"cursor={by_name}&sort=created", "cursor"), (f"cursor={by_name}x", "cursor"),
                 (f"cursor={quote('%ff')}", "cursor")]
        for query, field in cases:
            status, body, resp = await sc.call("GET", f"/keys?{query}")
            assert (status, body["error"], body["field"]) == (400, "invalid_parameter", field), (query, body)
            assert resp.content_type == "application/json"
        status, body, _ = await sc.call("GET", "/keys?role=root")
        assert body["valid_roles"] == sorted(sc.settings.roles)
        # Empty values mean "no filter"; the cursor works with the sort it was made for.
        status, body, _ = await sc.call("GET", f"/keys?q=&status=&role=&sort=name&limit=1&cursor={by_name}")
        assert status == 200
        assert [k["name"] for k in body["keys"]] == ["svc-001"]


async def test_a_scheduled_disable_shows_in_the_key_object(tmp_path: Path) -> None:
    async with admin_sidecar(tmp_path) as sc:
        old = await sc.create_key("old", ["viewer"])
        when = "2999-01-01T00:00:00.000Z"
        status, rotated, _ = await sc.call("POST", f"/keys/{old['id']}/rotate",
                                           json_body={"name": "new", "disable_old_at": when})
        assert status == 201
        assert rotated["rotated_from"]["disable_at"] == when
        assert rotated["disable_at"] is None
        _, shown, _ = await sc.call("GET", f"/keys/{old['id']}")
        assert shown["disable_at"] == when
        assert_matches("Key", shown)
        await sc.call("POST", f"/keys/{old['id']}/enable")  # enabling clears a scheduled disable
        _, shown, _ = await sc.call("GET", f"/keys/{old['id']}")
        assert shown["disable_at"] is None
