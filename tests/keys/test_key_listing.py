"""Listing keys a page at a time (docs/reference/admin-api.md, Listing keys) on both stores: every
order and direction pages through every key exactly once, filters combine, cursors stay stable
while keys are added, and each page is read in index order rather than by sorting the workspace."""

from __future__ import annotations

import base64
import json
import sqlite3
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidecar.keys.errors import InvalidInput
from sidecar.keys.listing import SORTS, KeyQuery, Position, decode_cursor, encode_cursor, key_query
from sidecar.keys.records import DISABLED, KeyRecord
from sidecar.keys.store import postgres, sqlite
from sidecar.keys.store.base import KeyStore
from sidecar.keys.store.postgres import PostgresKeyStore
from tests.support.records import T0, audit_record, key_record

ROLES = ("viewer", "writer", "org-admin")


def varied(n: int) -> KeyRecord:
    """Key n with a name out of creation order, shared creation times (ties broken by id), a
    last use for some and none for others, every third disabled, roles that differ."""
    base = key_record(n, name=f"{'ab'[n % 2]}-svc-{(7 * n) % 101:03d}")
    return replace(
        base, created_at=T0 + timedelta(seconds=n // 3),
        last_used_at=None if n % 4 == 0 else T0 + timedelta(minutes=(5 * n) % 11),
        status=DISABLED if n % 3 == 0 else base.status,
        roles=("viewer",) if n % 2 else ("viewer", "writer"))


async def fill(store: KeyStore, count: int) -> list[KeyRecord]:
    records = [varied(n) for n in range(1, count + 1)]
    await store.import_records(records, [])
    return records


def expected_order(records: list[KeyRecord], sort: str, descending: bool) -> list[str]:
    def key(r: KeyRecord) -> tuple[Any, ...]:
        if sort == "name":
            return (r.name,)
        if sort == "created":
            return (r.created_at, r.id)
        return (r.last_used_at.timestamp() if r.last_used_at else float("-inf"), r.id)
    return [r.id for r in sorted(records, key=key, reverse=descending)]


async def walk(store: KeyStore, query: KeyQuery) -> tuple[list[str], int]:
    """Every page of ``query`` through encoded cursors, as the API hands them out."""
    seen: list[str] = []
    pages = 0
    while True:
        page = await store.page_keys(query)
        pages += 1
        assert len(page.keys) <= query.limit
        seen.extend(k.id for k in page.keys)
        if page.next is None:
            return seen, pages
        assert len(page.keys) == query.limit
        cursor = encode_cursor(query, page.next)
        query = replace(query, after=decode_cursor(cursor, query.sort_token))


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("sort", SORTS)
async def test_every_order_pages_through_every_key_once(store: KeyStore, sort: str, descending: bool) -> None:
    records = await fill(store, 23)
    await store.import_records([key_record(99, workspace="globex")], [])
    seen, pages = await walk(store, KeyQuery("acme", sort=sort, descending=descending, limit=4))
    assert seen == expected_order(records, sort, descending)
    assert pages == 6
    # A limit that divides the count exactly ends without an empty page.
    _, pages = await walk(store, KeyQuery("acme", sort=sort, descending=descending, limit=23))
    assert pages == 1


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("sort", SORTS)
async def test_a_query_of_every_workspace_pages_through_all_of_them_once(
        store: KeyStore, sort: str, descending: bool) -> None:
    records = await fill(store, 11)
    # Another workspace's keys reuse the same names: in name order the id breaks those ties.
    others = [replace(varied(n), id=f"key_{n + 50:016d}", lookup_id=f"LOOK{n + 50:04d}", workspace="globex")
              for n in range(1, 8)]
    await store.import_records(others, [])
    everything = records + others

    def order(r: KeyRecord) -> tuple[Any, ...]:
        if sort == "name":
            return (r.name, r.id)
        if sort == "created":
            return (r.created_at, r.id)
        return (r.last_used_at.timestamp() if r.last_used_at else float("-inf"), r.id)

    seen, _ = await walk(store, KeyQuery(None, sort=sort, descending=descending, limit=3))
    assert seen == [r.id for r in sorted(everything, key=order, reverse=descending)]


async def test_filters_combine_and_search_ignores_case(store: KeyStore) -> None:
    records = await fill(store, 23)
    await store.import_records([key_record(100, name="A-SVC-CAPS")], [])

    names_by_id = {r.id: r.name for r in records} | {key_record(100).id: "A-SVC-CAPS"}

    async def names(**filters: Any) -> list[str]:
        seen, _ = await walk(store, KeyQuery("acme", sort="name", limit=5, **filters))
        return [names_by_id[i] for i in seen]

    assert await names(search="a-svc-c") == ["A-SVC-CAPS"]
    assert await names(search="SVC-0") == sorted(r.name for r in records if "-svc-0" in r.name)
    assert await names(status=DISABLED) == sorted(r.name for r in records if r.status == DISABLED)
    assert await names(role="writer") == sorted(r.name for r in records if "writer" in r.roles)
    assert await names(role="writer", status="enabled", search="b-") == sorted(
        r.name for r in records if "writer" in r.roles and r.status == "enabled" and r.name.startswith("b-"))
    assert await names(role="org-admin") == []
    # Nothing a name can hold: no match, without a query the store could choke on.
    for impossible in ("svc 1", "svc%", "\udcff", "ä", "x" * 65):
        assert await names(search=impossible) == []


async def test_a_cursor_is_stable_while_keys_are_added_and_changed(store: KeyStore) -> None:
    for n in range(1, 7):
        await store.import_records([key_record(n, name=f"k{n}")], [])
    query = KeyQuery("acme", sort="name", limit=3)
    first = await store.page_keys(query)
    assert [k.name for k in first.keys] == ["k1", "k2", "k3"]
    # New keys before and after the page boundary, and a change to a key on the next page.
    await store.import_records([key_record(10, name="k0"), key_record(11, name="k45")], [])
    await store.set_status(key_record(5).id, DISABLED, T0, audit_record("key.disabled", key_record(5)))
    assert first.next is not None
    second = await store.page_keys(replace(query, after=first.next))
    assert [k.name for k in second.keys] == ["k4", "k45", "k5"]
    assert second.keys[2].status == DISABLED


async def test_a_key_is_found_by_name_in_its_workspace_only(store: KeyStore) -> None:
    other = key_record(2, name="ci", workspace="globex", lookup="LOOKGLOB")
    await store.import_records([key_record(1, name="ci"), other], [])
    found = await store.get_key_by_name("acme", "ci")
    assert found is not None and found.id == key_record(1).id
    assert await store.get_key_by_name("acme", "CI") is None
    assert await store.get_key_by_name("initech", "ci") is None


async def test_audit_lists_filter_by_action_and_key(store: KeyStore) -> None:
    one, two = key_record(1), key_record(2)
    await store.insert_key(one, [audit_record("key.created", one)])
    await store.insert_key(two, [audit_record("key.created", two)])
    await store.set_status(one.id, DISABLED, T0, audit_record("key.disabled", one))
    await store.append_audit([audit_record("admin.login"),
                              audit_record("key.created", replace(one, workspace="globex"))])
    assert [e.action for e in await store.list_audit("acme", 10, None, key_id=one.id)] == [
        "key.disabled", "key.created"]
    assert [e.key_id for e in await store.list_audit("acme", 10, None, action="key.created")] == [two.id, one.id]
    assert [e.action for e in await store.list_audit("acme", 10, None, action="key.created", key_id=two.id)] == [
        "key.created"]
    newest = (await store.list_audit("acme", 10, None, action="key.created"))[0]
    assert [e.key_id for e in await store.list_audit("acme", 10, newest.id, action="key.created")] == [one.id]
    assert await store.list_audit("acme", 10, None, action="key.rotated") == []


# -- every page is an index range scan ---------------------------------------------------------

PLAN_QUERIES = [
    KeyQuery("acme", sort=sort, descending=descending, after=after,
             status="enabled" if filtered else None, role="viewer" if filtered else None,
             search="svc" if filtered else None)
    for sort in SORTS for descending in (False, True)
    for after in (None, Position("2030-01-02T03:04:05.678Z" if sort != "name" else "m", "key_x"))
    for filtered in (False, True)
]


@pytest.mark.sqlite_only
async def test_sqlite_reads_each_page_in_index_order(store: KeyStore, db_path: Path) -> None:
    await fill(store, 50)
    with sqlite3.connect(db_path) as con:
        for query in PLAN_QUERIES:
            sql, params = sqlite.page_sql(query)
            plan = " | ".join(row[3] for row in con.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "TEMP B-TREE" not in plan, (query, plan)
            search = plan.split(" | ")[0]
            assert "INDEX" in search, (query, plan)
            if query.after is not None:  # the page starts where the cursor points, not at the top
                assert "<" in search or ">" in search, (query, plan)
            rows = con.execute(sql, params).fetchall()  # and the statement runs as planned
            assert len(rows) <= query.limit + 1


async def test_postgresql_reads_each_page_in_index_order(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url)
    await store.open()
    try:
        await fill(store, 50)
    finally:
        await store.close()
    con = await asyncpg.connect(pg_url)
    try:
        # With sequential scans priced out, a plan that still sorts could not read in index order.
        await con.execute("SET enable_seqscan = off")
        for query in PLAN_QUERIES:
            sql, args = postgres.page_sql(query)
            plan = json.loads(await con.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args))
            nodes = _node_types(plan[0]["Plan"])
            assert "Sort" not in nodes and "Incremental Sort" not in nodes, (query, nodes)
            assert any(n.startswith("Index") for n in nodes), (query, nodes)
            if query.after is not None:  # the page starts where the cursor points, not at the top
                conditions = " ".join(_index_conditions(plan[0]["Plan"]))
                assert "<" in conditions or ">" in conditions, (query, conditions)
    finally:
        await con.close()


def _node_types(node: dict[str, Any]) -> list[str]:
    return [node["Node Type"], *(t for child in node.get("Plans", []) for t in _node_types(child))]


def _index_conditions(node: dict[str, Any]) -> list[str]:
    own = [node["Index Cond"]] if "Index Cond" in node else []
    return [*own, *(c for child in node.get("Plans", []) for c in _index_conditions(child))]


# -- query validation ----------------------------------------------------------------------------


def test_query_values_are_validated_naming_the_parameter() -> None:
    for kwargs, field in [({"status": "on"}, "status"), ({"role": "root"}, "role"), ({"sort": "id"}, "sort"),
                          ({"sort": "--name"}, "sort"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
                          ({"limit": "\u0661"}, "limit"), ({"limit": "-1"}, "limit"), ({"cursor": "!!"}, "cursor"),
                          ({"cursor": "e30"}, "cursor")]:
        with pytest.raises(InvalidInput) as caught:
            key_query("acme", ROLES, **kwargs)
        assert (caught.value.code, caught.value.field) == ("invalid_parameter", field), kwargs
    query = key_query("acme", ROLES, search="ci", status="disabled", role="viewer", sort="-last_used", limit="1000")
    assert (query.search, query.status, query.role, query.sort, query.descending, query.limit) == (
        "ci", "disabled", "viewer", "last_used", True, 1000)
    assert key_query("acme", ROLES) == KeyQuery("acme")


def test_a_cursor_only_works_with_the_sort_it_was_made_for() -> None:
    by_name = key_query("acme", ROLES, sort="name")
    cursor = encode_cursor(by_name, Position("ci-bot", "key_0000000000000001"))
    assert key_query("acme", ROLES, sort="name", cursor=cursor).after == Position("ci-bot", "key_0000000000000001")
    for other in ("-name", "created", "last_used"):
        with pytest.raises(InvalidInput, match="sort=name"):
            key_query("acme", ROLES, sort=other, cursor=cursor)
    never = encode_cursor(key_query("acme", ROLES, sort="last_used"), Position(None, "key_1"))
    assert key_query("acme", ROLES, sort="last_used", cursor=never).after == Position(None, "key_1")
    # A hand-made cursor with a value of the wrong kind is refused, not passed to the store.
    for sort, forged in [("created", ["created", None, "key_1"]), ("created", ["created", "yesterday", "key_1"]),
                         ("name", ["name", "a b", "key_1"]), ("name", ["name", "x", "key 1"]),
                         ("name", ["name", "x"]), ("name", {"sort": "name"}), ("name", ["name", 1, "key_1"])]:
        text = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
        with pytest.raises(InvalidInput) as caught:
            key_query("acme", ROLES, sort=sort, cursor=text)
        assert caught.value.field == "cursor"
