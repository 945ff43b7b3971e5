"""The admin page's key table at scale and the key lifecycle in the page (docs/reference/admin-api.md,
The page), in real Chromium against a real sidecar and SQLite file: search, filters, sort and
paging (also with 10,000 keys), one tab stop with arrow keys (WAI-ARIA grid pattern), rotation,
expiry, the key detail view, and the warning before disabling the key the page is signed in with.

Keys beyond a handful go straight into the store (records with a fixed hash: no argon2 per key).
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from sidecar.keys.records import DISABLED, KeyRecord, from_rfc3339
from tests.support.admin import AdminSidecar, admin_sidecar
from tests.support.browser import KEY_SHAPE, admin_page, browser, key_row, role_box, sign_in
from tests.support.records import key_record

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]  # the module-scoped fixture, used by name

PAGE_SIZE = 25
# Before the admin key "ops", which each test's sidecar creates now.
PAST = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def svc(n: int) -> KeyRecord:
    """Key n: svc-NNNNN, created n seconds after PAST, every 4th disabled, every 3rd a writer."""
    return replace(key_record(n, name=f"svc-{n:05d}"), lookup_id=f"L{n:07d}", created_at=PAST + timedelta(seconds=n),
                   status=DISABLED if n % 4 == 0 else "enabled",
                   roles=("viewer", "writer") if n % 3 == 0 else ("viewer",))


async def add_keys(sc: AdminSidecar, count: int) -> None:
    await sc.services.store.import_records([svc(n) for n in range(1, count + 1)], [])


def showing(first: int, last: int, *, last_page: bool = False) -> str:
    return f"Showing {first}\u2013{last}" + (" (the last page)" if last_page else "")


async def names_shown(page: Page) -> list[str]:
    return await page.locator("#keys-body .key-name").all_inner_texts()


async def table_settled(page: Page) -> None:
    await expect(page.locator("#keys-table")).not_to_have_attribute("aria-busy", "true")


async def test_search_filters_sort_and_pages(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await add_keys(sc, 60)
        await sign_in(page, sc)
        # Newest first: ops, then svc-00060 down.
        await expect(page.locator("#keys-body tr")).to_have_count(PAGE_SIZE)
        assert (await names_shown(page))[:3] == ["ops", "svc-00060", "svc-00059"]
        await expect(page.locator("#keys-range")).to_have_text(showing(1, 25))
        prev, nxt = page.get_by_role("button", name="Previous"), page.get_by_role("button", name="Next")
        await expect(prev).to_be_disabled()

        # Pages: forward twice (the last page says so), back once.
        await nxt.click()
        await expect(page.locator("#keys-range")).to_have_text(showing(26, 50))
        assert (await names_shown(page))[0] == "svc-00036"
        await nxt.click()
        await expect(page.locator("#keys-range")).to_have_text(showing(51, 61, last_page=True))
        await expect(nxt).to_be_disabled()
        await prev.click()
        await expect(page.locator("#keys-range")).to_have_text(showing(26, 50))

        # Search (any case) starts again at the first page.
        await page.get_by_label("Search keys by name").fill("SVC-0004")
        await expect(page.locator("#keys-range")).to_have_text("10 matching keys")
        assert await names_shown(page) == [f"svc-{n:05d}" for n in range(49, 39, -1)]
        # Filters combine with it.
        await page.get_by_label("Status").select_option("disabled")
        await expect(page.locator("#keys-range")).to_have_text("3 matching keys")
        assert await names_shown(page) == ["svc-00048", "svc-00044", "svc-00040"]
        await page.locator("#panel-keys").get_by_label("Role").select_option("writer")
        await expect(page.locator("#keys-range")).to_have_text("1 matching key")
        assert await names_shown(page) == ["svc-00048"]
        # Nothing matches: say so, and offer the way back.
        await page.get_by_label("Search keys by name").fill("nope")
        await expect(page.get_by_text("No keys match")).to_be_visible()
        await expect(page.locator("#keys-table")).to_be_hidden()
        await page.get_by_role("button", name="Clear search and filters").click()
        await expect(page.locator("#keys-range")).to_have_text(showing(1, 25))
        await expect(page.get_by_label("Search keys by name")).to_have_value("")
        await expect(page.get_by_label("Status")).to_have_value("")

        # Sort by name: A to Z first, then Z to A; the header says which (aria-sort).
        header = page.locator("#keys-table th[data-sort=name]")
        await header.get_by_role("button").click()
        await expect(header).to_have_attribute("aria-sort", "ascending")
        await table_settled(page)
        assert (await names_shown(page))[:2] == ["ops", "svc-00001"]
        await header.get_by_role("button").click()
        await expect(header).to_have_attribute("aria-sort", "descending")
        await table_settled(page)
        assert (await names_shown(page))[:2] == ["svc-00060", "svc-00059"]
        await expect(page.locator("#keys-table th[data-sort=created]")).to_have_attribute("aria-sort", "none")
        # Last used: most recent first (only ops has been used).
        await page.locator("#keys-table th[data-sort=last_used]").get_by_role("button").click()
        await table_settled(page)
        assert (await names_shown(page))[0] == "ops"
        watch.assert_clean()


async def test_ten_thousand_keys_load_one_page_and_search_finds_any(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await add_keys(sc, 10_000)
        await sign_in(page, sc)
        await expect(page.locator("#keys-body tr")).to_have_count(PAGE_SIZE)
        # One page of rows in the document, whatever the workspace holds.
        assert await page.locator("#keys-table tr").count() == PAGE_SIZE + 1
        await page.get_by_label("Search keys by name").fill("svc-07777")
        await expect(page.locator("#keys-body tr")).to_have_count(1)
        assert await names_shown(page) == ["svc-07777"]
        await page.get_by_label("Search keys by name").fill("")
        await expect(page.locator("#keys-body tr")).to_have_count(PAGE_SIZE)
        await page.get_by_label("Status").select_option("disabled")
        await table_settled(page)
        assert (await names_shown(page))[:2] == ["svc-10000", "svc-09996"]
        await page.get_by_role("button", name="Next").click()
        await expect(page.locator("#keys-range")).to_have_text(showing(26, 50))
        assert (await names_shown(page))[0] == "svc-09900"
        # Each table render set its mark (what bench/admin_page.py times).
        marks = await page.evaluate("() => performance.getEntriesByName('toolio:keys-rendered').length")
        assert marks >= 5
        lists = [url for url in watch.requests if "/admin/api/keys?" in url]
        assert all("limit=25" in url for url in lists)
        watch.assert_clean()


async def focused(page: Page) -> dict[str, Any]:
    """Where focus is: the element's text / label and its cell's row and column in the grid."""
    where: dict[str, Any] = await page.evaluate("""() => {
        const node = document.activeElement;
        const cell = node.closest('td, th');
        const row = cell ? cell.parentElement : null;
        return {text: (node.getAttribute('aria-label') || node.textContent || '').trim(),
                tag: node.tagName, col: cell ? cell.cellIndex : null,
                key: row && row.dataset ? row.dataset.keyId || null : null,
                header: Boolean(row && row.parentElement.tagName === 'THEAD'),
                inTable: Boolean(node.closest('#keys-table'))};
    }""")
    return where


async def test_the_table_is_one_tab_stop_moved_through_with_arrow_keys(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await add_keys(sc, 4)
        await sign_in(page, sc)
        await expect(page.locator("#keys-body tr")).to_have_count(5)
        stops = await page.evaluate("() => document.querySelectorAll('#keys-table [tabindex=\"0\"]').length")
        assert stops == 1
        # Tab from the last filter enters the table at the first key's name; the next Tab leaves it.
        await page.locator("#panel-keys").get_by_label("Role").focus()
        await page.keyboard.press("Tab")
        assert (await focused(page))["text"] == "ops"
        await page.keyboard.press("Tab")
        assert not (await focused(page))["inTable"]
        await page.keyboard.press("Shift+Tab")
        assert (await focused(page))["text"] == "ops"

        # Arrows move by cell; Home / End to the row's ends; Ctrl+End to the last row.
        await page.keyboard.press("ArrowDown")
        assert (await focused(page))["text"] == "svc-00004"
        await page.keyboard.press("ArrowRight")
        assert (await focused(page))["col"] == 1
        await page.keyboard.press("End")
        assert (await focused(page))["text"] == "Actions for svc-00004"
        await page.keyboard.press("Home")
        assert (await focused(page))["text"] == "svc-00004"
        await page.keyboard.press("Control+End")
        now = await focused(page)
        assert (now["text"], now["col"]) == ("Actions for svc-00001", 6)
        # Moving made no second tab stop.
        stops = await page.evaluate("() => document.querySelectorAll('#keys-table [tabindex=\"0\"]').length")
        assert stops == 1
        await page.keyboard.press("Shift+Tab")
        await page.keyboard.press("Tab")
        assert (await focused(page))["text"] == "Actions for svc-00001"

        # Up into the header row: the sortable headers are buttons; Enter sorts.
        await page.keyboard.press("Control+Home")
        now = await focused(page)
        assert (now["header"], now["text"]) == (True, "Name")
        await page.keyboard.press("Enter")
        await expect(page.locator("#keys-table th[data-sort=name]")).to_have_attribute("aria-sort", "ascending")
        await table_settled(page)
        # Enter on a plain cell opens the key's details; Escape returns to that cell.
        await page.keyboard.press("ArrowDown")
        await page.keyboard.press("ArrowDown")
        await page.keyboard.press("ArrowRight")
        await page.keyboard.press("Enter")
        details = page.locator("#detail-dialog")
        await expect(details).to_be_visible()
        await expect(details.get_by_role("heading", name="svc-00001")).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(details).to_be_hidden()
        now = await focused(page)
        assert (now["key"], now["col"]) == (svc(1).id, 1)
        watch.assert_clean()


async def test_rotate_from_the_menu_shows_the_new_key_once_and_schedules_the_old_ones_disable(
        tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc, admin_page(browser, sc) as (_, page, watch):
        old = await sc.create_key("billing-sync", ["viewer", "writer"])
        await sign_in(page, sc)
        await key_row(page, "billing-sync").click(button="right")
        await page.get_by_role("menuitem", name="Rotate…").click()
        dialog = page.locator("#rotate-dialog")
        await expect(dialog.get_by_role("heading", name="Rotate billing-sync")).to_be_visible()
        await expect(dialog.get_by_label("New key name")).to_have_value("billing-sync-2")
        await dialog.get_by_label("Disable the old key", exact=True).select_option(label="In 7 days")
        await dialog.get_by_role("button", name="Rotate").click()

        shown = page.locator("#key-dialog")
        await expect(shown).to_be_visible()
        await expect(shown.get_by_role("heading")).to_have_text("Copy your new API key for billing-sync-2")
        await expect(shown).to_contain_text("This key will not be shown again")
        await expect(shown.locator("#key-note")).to_contain_text("billing-sync will be disabled on")
        new_key = await shown.locator("input").input_value()
        assert KEY_SHAPE.fullmatch(new_key)
        assert await sc.proxy_status(new_key) == 200
        await shown.get_by_role("button", name="Done").click()
        assert new_key not in await page.content()

        # The new key is in the table with the old one's roles; the old one says when it stops.
        new_row = key_row(page, "billing-sync-2")
        await expect(new_row.locator("td").nth(2)).to_have_text(re.compile("viewer.*writer"))
        await expect(key_row(page, "billing-sync").locator("td").nth(3)).to_contain_text("Disables in 7 days")
        _, record, _ = await sc.call("GET", f"/keys/{old['id']}")
        scheduled = from_rfc3339(record["disable_at"])
        assert scheduled is not None
        assert abs((scheduled - datetime.now(UTC)) - timedelta(days=7)) < timedelta(minutes=5)
        assert record["status"] == "enabled"

        # Without a schedule the old key keeps working and the page says what to do next.
        await key_row(page, "billing-sync-2").click(button="right")
        await page.get_by_role("menuitem", name="Rotate…").click()
        await expect(dialog.get_by_label("New key name")).to_have_value("billing-sync-3")
        await dialog.get_by_role("button", name="Rotate").click()
        await expect(shown.locator("#key-note")).to_contain_text("billing-sync-2 still works")
        await shown.get_by_role("button", name="Done").click()
        await expect(key_row(page, "billing-sync-3")).to_have_count(1)

        # A taken name is refused in the dialog, naming the field.
        await key_row(page, "billing-sync-3").click(button="right")
        await page.get_by_role("menuitem", name="Rotate…").click()
        await dialog.get_by_label("New key name").fill("billing-sync")
        await dialog.get_by_role("button", name="Rotate").click()
        await expect(dialog.get_by_role("alert")).to_contain_text("already exists")
        await expect(dialog.get_by_label("New key name")).to_have_attribute("aria-invalid", "true")
        await dialog.get_by_label("New key name").fill("billing-sync-4")
        await expect(dialog.get_by_role("alert")).to_be_hidden()
        await dialog.get_by_role("button", name="Cancel").click()
        assert [c for c in watch.console_errors if "409" not in c] == []
        assert watch.page_errors == watch.dialogs == watch.foreign_requests == []


async def test_add_key_with_an_expiry(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await sign_in(page, sc)
        add = page.locator("#add-dialog")

        async def create(name: str, choose: str, at: str | None = None) -> dict[str, Any]:
            await page.get_by_role("button", name="Add API Key").click()
            await add.get_by_label("Name").fill(name)
            await role_box(add, "viewer").check()
            await add.get_by_label("Expires", exact=True).select_option(label=choose)
            if at is not None:
                await add.get_by_label("Expiry date and time").fill(at)
            await add.get_by_role("button", name="Save").click()
            await expect(page.locator("#key-dialog")).to_be_visible()
            await page.get_by_role("button", name="Done").click()
            _, body, _ = await sc.call("GET", f"/keys?q={name}")
            return dict(body["keys"][0])

        month = await create("month-key", "In 30 days")
        expires = from_rfc3339(month["expires_at"])
        assert expires is not None
        assert abs((expires - datetime.now(UTC)) - timedelta(days=30)) < timedelta(minutes=5)
        await expect(key_row(page, "month-key").locator("td").nth(3)).to_contain_text("Expires")

        dated = await create("dated-key", "On a date…", "2031-05-06T07:08")
        # datetime-local is the browser's local time (the test browser's zone is the machine's).
        local = datetime(2031, 5, 6, 7, 8).astimezone(UTC)
        assert dated["expires_at"] == local.isoformat(timespec="milliseconds").replace("+00:00", "Z")

        never = await create("forever-key", "Never")
        assert never["expires_at"] is None

        # A time in the past is refused on the field, and nothing is created.
        await page.get_by_role("button", name="Add API Key").click()
        await add.get_by_label("Name").fill("past-key")
        await role_box(add, "viewer").check()
        await add.get_by_label("Expires", exact=True).select_option(label="On a date…")
        await add.get_by_label("Expiry date and time").fill("2001-01-01T00:00")
        await add.get_by_role("button", name="Save").click()
        await expect(add.get_by_role("alert")).to_contain_text("in the future")
        await expect(add.get_by_label("Expires", exact=True)).to_have_attribute("aria-invalid", "true")
        await add.get_by_role("button", name="Cancel").click()
        _, body, _ = await sc.call("GET", "/keys?q=past-key")
        assert body["keys"] == []
        assert watch.page_errors == watch.dialogs == watch.foreign_requests == []


async def test_key_details_show_its_history_and_lifecycle(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc, admin_page(browser, sc) as (_, page, watch):
        agent = await sc.create_key("etl-agent", ["writer"])
        assert await sc.proxy_status(agent["key"]) == 200
        await sc.call("POST", f"/keys/{agent['id']}/rotate",
                      json_body={"name": "etl-agent-2", "disable_old_at": "2999-06-01T12:00:00Z"})
        await sign_in(page, sc)
        await key_row(page, "etl-agent").get_by_role("button", name="etl-agent", exact=True).click()
        details = page.locator("#detail-dialog")
        await expect(details).to_be_visible()
        fields = details.locator("#detail-fields")
        await expect(fields).to_contain_text(agent["id"])
        await expect(fields).to_contain_text("by ops")            # created by
        await expect(fields).to_contain_text("plans:read, plans:write")
        await expect(fields.locator("dt:text-is('Last used') + dd")).to_contain_text("just now")
        await expect(fields.locator("dt:text-is('Expires') + dd")).to_have_text("Never")
        await expect(fields.locator("dt:text-is('Scheduled disable') + dd")).to_contain_text("Jun 1, 2999")
        await expect(details.locator("#detail-self")).to_be_hidden()
        # Recent calls: the page finds the activity endpoint in the API's OpenAPI document and
        # asks it; this key has made no tool calls yet.
        await expect(details.locator("#key-activity")).to_contain_text("No activity recorded.")
        assert [url for url in watch.requests if url.endswith(f"/keys/{agent['id']}/activity")]

        # Disable from the details: the badge and the button follow.
        await details.get_by_role("button", name="Disable").click()
        await expect(details.locator("#detail-status")).to_have_text("Disabled")
        await expect(details.get_by_role("button", name="Enable")).to_be_visible()
        # A disable clears the schedule.
        await expect(fields.locator("dt:text-is('Scheduled disable') + dd")).to_have_text("None")
        assert await sc.proxy_status(agent["key"]) == 401
        await details.get_by_role("button", name="Close").click()
        await expect(key_row(page, "etl-agent").locator("td").nth(3)).to_have_text("Disabled")
        watch.assert_clean()


async def test_disabling_the_signed_in_key_asks_first(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        other = await sc.create_key("other-admin", ["org-admin"])
        await sign_in(page, sc)
        await expect(key_row(page, "ops")).to_contain_text("you")
        confirm = page.locator("#confirm-dialog")

        # Another key is disabled at once, without a question.
        await key_row(page, "other-admin").click(button="right")
        await page.get_by_role("menuitem", name="Disable").click()
        await expect(key_row(page, "other-admin").locator("td").nth(3)).to_have_text("Disabled")
        await expect(confirm).to_be_hidden()
        await sc.call("POST", f"/keys/{other['id']}/enable")

        # The signed-in key: a warning first; Cancel leaves it enabled.
        await key_row(page, "ops").click(button="right")
        await page.get_by_role("menuitem", name="Disable").click()
        await expect(confirm).to_be_visible()
        await expect(confirm).to_contain_text("You are signed in with ops")
        await expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
        await confirm.get_by_role("button", name="Cancel").click()
        record = await sc.services.store.get_key(sc.admin_key_id)
        assert record is not None and record.status == "enabled"

        # Confirmed: the key is disabled and the page is back at the sign-in form, saying why.
        await key_row(page, "ops").click(button="right")
        await page.get_by_role("menuitem", name="Disable").click()
        await confirm.get_by_role("button", name="Disable and sign out").click()
        await expect(page.get_by_label("Admin API key")).to_be_visible()
        await expect(page.locator("#login-error")).to_contain_text("the key you were signed in with")
        record = await sc.services.store.get_key(sc.admin_key_id)
        assert record is not None and record.status == "disabled"
        assert watch.page_errors == watch.dialogs == watch.foreign_requests == []


async def test_a_key_made_with_a_rate_limit_and_changed_from_its_menu(tmp_path: Path, browser: Browser) -> None:
    """docs/reference/limits.md, A key's own limit: the create form's Rate limit, the row menu's
    Set rate limit…, the detail view saying where the limit comes from, and a bad value refused
    on the field."""
    async with (admin_sidecar(tmp_path, roles={"viewer": {"rate_limit": "600/minute"}}) as sc,
                admin_page(browser, sc) as (_, page, watch)):
        await sign_in(page, sc)
        add = page.locator("#add-dialog")
        await page.get_by_role("button", name="Add API Key").click()
        # Each role offered says its limit.
        await expect(add.locator("#key-roles-list")).to_contain_text("rate limit: 600/minute")
        await add.get_by_label("Name").fill("paced-agent")
        await role_box(add, "viewer").check()
        await add.get_by_label("Rate limit").fill("100/second")
        await add.get_by_role("button", name="Save").click()
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.get_by_role("button", name="Done").click()
        _, body, _ = await sc.call("GET", "/keys?q=paced-agent")
        created = body["keys"][0]
        assert (created["rate_limit"], created["rate_limit_source"]) == ("100/second", "key")

        # Right-click -> Set rate limit…: the dialog shows the key's own value.
        row = key_row(page, "paced-agent")
        await row.click(button="right")
        await page.get_by_role("menuitem", name="Set rate limit…").click()
        dialog = page.locator("#limit-dialog")
        await expect(dialog).to_be_visible()
        value = dialog.get_by_label("Rate limit")
        await expect(value).to_have_value("100/second")
        await expect(value).to_be_focused()
        # A malformed value is refused on the field; nothing changes.
        await value.fill("5/day")
        await dialog.get_by_role("button", name="Save").click()
        await expect(dialog.get_by_role("alert")).to_contain_text("N/second")
        await expect(value).to_have_attribute("aria-invalid", "true")
        _, still, _ = await sc.call("GET", f"/keys/{created['id']}")
        assert still["rate_limit"] == "100/second"
        # A good one is saved, and focus goes back to the row.
        await value.fill("5/minute")
        await expect(value).not_to_have_attribute("aria-invalid", "true")
        await dialog.get_by_role("button", name="Save").click()
        await expect(dialog).to_be_hidden()
        _, changed, _ = await sc.call("GET", f"/keys/{created['id']}")
        assert (changed["rate_limit"], changed["effective_rate_limit"]) == ("5/minute", "5/minute")

        # The details say the limit and where it comes from.
        await key_row(page, "paced-agent").get_by_role("button", name="paced-agent", exact=True).click()
        details = page.locator("#detail-dialog")
        fields = details.locator("#detail-fields")
        await expect(fields.locator("dt:text-is('Rate limit') + dd")).to_have_text("5/minute (its own)")
        await details.get_by_role("button", name="Close").click()

        # Emptied: back to its roles' limit.
        await key_row(page, "paced-agent").click(button="right")
        await page.get_by_role("menuitem", name="Set rate limit…").click()
        await dialog.get_by_label("Rate limit").fill("")
        await dialog.get_by_role("button", name="Save").click()
        await expect(dialog).to_be_hidden()
        _, back, _ = await sc.call("GET", f"/keys/{created['id']}")
        assert (back["rate_limit"], back["rate_limit_source"], back["effective_rate_limit"]) == (
            None, "roles", "600/minute")
        await key_row(page, "paced-agent").get_by_role("button", name="paced-agent", exact=True).click()
        await expect(fields.locator("dt:text-is('Rate limit') + dd")).to_have_text("600/minute (from its roles)")
        await details.get_by_role("button", name="Close").click()

        # The audit view names the change.
        await page.get_by_role("tab", name="Audit").click()
        updated = page.locator("#audit-body tr", has_text="Key updated")
        await expect(updated).to_have_count(2)
        await expect(updated.first).to_contain_text("rate limit 5/minute → roles'")
        # The refused value's 422 is the one console message (a failed fetch); nothing else.
        assert watch.page_errors == watch.dialogs == watch.foreign_requests == []
