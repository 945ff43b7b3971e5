"""The admin page in real Chromium (Playwright), against a real sidecar, SQLite file and MCP
upstream: sign in, add a key and copy it once, disable / enable from the context menu by mouse
and by keyboard, the audit view, logout, and a cross-site page that tries to use the session.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Locator, Route, expect

from tests.support.admin import AdminSidecar, admin_sidecar
from tests.support.browser import add_key, admin_page, browser, key_row, role_box, sign_in
from tests.support.mcp import mcp_client, mcp_url

# One event loop for the module, so the shared browser fixture can serve every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]  # the module-scoped fixture, used by name


async def test_add_key_copy_once_and_toggle_it_from_the_context_menu(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc, admin_page(browser, sc) as (_, page, watch):
        await sign_in(page, sc)
        # The page says which workspace it manages: the signed-in key's.
        await expect(page.locator("#workspace")).to_have_text(sc.settings.workspace)
        # The admin key went to the server once and is nowhere in the page or web storage.
        storage = await page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
        assert storage == [0, 0, ""]  # the session cookie is HttpOnly
        assert await page.get_by_label("Admin API key").input_value() == ""
        assert sc.admin_key not in await page.content()

        # -- Add API Key with two roles; the key is shown once, with Copy and a warning.
        key = await add_key(page, "ci-agent", ["viewer", "writer"])
        shown = page.locator("#key-dialog")
        await expect(shown).to_contain_text("This key will not be shown again")
        await shown.get_by_role("button", name="Copy").click()
        await expect(shown.locator("#copy-status")).to_have_text("Copied to the clipboard.")
        assert await page.evaluate("() => navigator.clipboard.readText()") == key
        await shown.get_by_role("button", name="Done").click()
        await expect(shown).to_be_hidden()
        assert key not in await page.content()
        values = await page.evaluate("() => Array.from(document.querySelectorAll('input'), i => i.value)")
        assert key not in values

        row = key_row(page, "ci-agent")
        cells = row.locator("td")
        await expect(cells.nth(1)).to_have_text(key[:8] + "...")
        await expect(cells.nth(2)).to_contain_text("viewer")
        await expect(cells.nth(2)).to_contain_text("writer")
        await expect(cells.nth(3)).to_have_text("Enabled")
        await expect(cells.nth(4)).to_have_text("Never")

        # -- The copied key works through the proxy with the real MCP client.
        async with mcp_client(mcp_url(sc.proxy_url), token=key) as client:
            who = await client.call_tool("whoami", {})
        assert who.structured_content is not None
        assert who.structured_content["key_name"] == "ci-agent"
        assert who.structured_content["roles"] == "viewer,writer"

        # -- Right-click -> Disable: the Status cell flips at once and the proxy refuses the key.
        await row.click(button="right")
        menu = page.get_by_role("menu")
        await expect(menu).to_be_visible()
        await expect(menu.get_by_role("menuitem")).to_have_text(
            ["View details", "Activity", "Rotate…", "Set rate limit…", "Disable"])
        await expect(menu.get_by_role("menuitem", name="Enable")).to_have_count(0)
        await menu.get_by_role("menuitem", name="Disable").click()
        await expect(menu).to_be_hidden()
        await expect(cells.nth(3)).to_have_text("Disabled", timeout=2000)
        assert await sc.proxy_status(key) == 401

        # The change survives a reload (it is in the store, not just the DOM).
        await page.reload()
        await expect(key_row(page, "ci-agent").locator("td").nth(3)).to_have_text("Disabled")

        # -- Right-click -> Enable restores the same key.
        row = key_row(page, "ci-agent")
        await row.click(button="right")
        await expect(page.get_by_role("menuitem", name="Disable")).to_have_count(0)
        await page.get_by_role("menuitem", name="Enable").click()
        await expect(row.locator("td").nth(3)).to_have_text("Enabled", timeout=2000)
        assert await sc.proxy_status(key) == 200

        # -- Escape closes the menu without doing anything.
        await row.click(button="right")
        await expect(page.get_by_role("menu")).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(page.get_by_role("menu")).to_be_hidden()
        await expect(row.locator("td").nth(3)).to_have_text("Enabled")

        # -- The audit view lists what happened, newest first.
        await page.get_by_role("tab", name="Audit").click()
        audit = page.locator("#audit-body tr")
        await expect(audit.first).to_be_visible()
        # The MCP call above is a tool.called event, written with its batch whenever that is
        # flushed (so before or after the key events); the key events are in their order.
        texts = [t for t in await audit.all_inner_texts() if "Tool called" not in t]
        assert "Key enabled" in texts[0]
        assert "ci-agent" in texts[0]
        assert "ops" in texts[0]
        assert "127.0.0.1" in texts[0]
        assert any("Key created" in t and "ci-agent" in t for t in texts)
        assert any("Signed in" in t and "ops" in t for t in texts)

        # -- Logout ends the session: the login form is back, also after a reload.
        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_label("Admin API key")).to_be_visible()
        await page.reload()
        await expect(page.get_by_label("Admin API key")).to_be_visible()
        await expect(page.get_by_role("heading", name="API Keys")).to_be_hidden()
        watch.assert_clean()
        assert key not in await page.content()


async def test_context_menu_works_from_the_keyboard(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        agent = await sc.create_key("kbd-agent", ["viewer"])
        await sign_in(page, sc)
        row = key_row(page, "kbd-agent")
        status = row.locator("td").nth(3)
        await expect(status).to_have_text("Enabled")
        name = row.get_by_role("button", name="kbd-agent", exact=True)

        # A cell of the row focused, Shift+F10: the menu opens and focus moves into it.
        await name.focus()
        await page.keyboard.press("Shift+F10")
        menu = page.get_by_role("menu")
        await expect(menu).to_be_visible()
        await expect(menu.get_by_role("menuitem", name="View details")).to_be_focused()
        # Escape closes it and returns focus to the cell it came from.
        await page.keyboard.press("Escape")
        await expect(menu).to_be_hidden()
        await expect(name).to_be_focused()

        # Shift+F10, arrow down to Activity, End to Disable, Enter.
        await page.keyboard.press("Shift+F10")
        await expect(menu).to_be_visible()
        await page.keyboard.press("ArrowDown")
        await expect(menu.get_by_role("menuitem", name="Activity")).to_be_focused()
        await page.keyboard.press("End")
        await expect(menu.get_by_role("menuitem", name="Disable")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(status).to_have_text("Disabled", timeout=2000)
        await expect(menu).to_be_hidden()
        _, record, _ = await sc.call("GET", f"/keys/{agent['id']}")
        assert record["status"] == "disabled"

        # The ContextMenu key works too, from any cell of the row.
        await key_row(page, "kbd-agent").locator("td").nth(2).focus()
        await page.keyboard.press("ContextMenu")
        await expect(menu.get_by_role("menuitem", name="View details")).to_be_focused()
        await page.keyboard.press("Escape")

        # The row's ⋯ button: the arrow keys reach it (End of the row), Enter, End, Enter.
        row = key_row(page, "kbd-agent")
        await page.keyboard.press("End")
        actions = row.get_by_role("button", name="Actions for kbd-agent")
        await expect(actions).to_be_focused()
        await expect(actions).to_have_attribute("aria-haspopup", "menu")
        await page.keyboard.press("Enter")
        await expect(actions).to_have_attribute("aria-expanded", "true")
        await page.keyboard.press("Home")
        await expect(menu.get_by_role("menuitem", name="View details")).to_be_focused()
        await page.keyboard.press("ArrowUp")  # wraps round to the last item
        await expect(menu.get_by_role("menuitem", name="Enable")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(key_row(page, "kbd-agent").locator("td").nth(3)).to_have_text("Enabled", timeout=2000)
        _, record, _ = await sc.call("GET", f"/keys/{agent['id']}")
        assert record["status"] == "enabled"
        watch.assert_clean()


async def test_api_errors_show_inline_never_as_alerts(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await page.goto(sc.admin_origin + "/admin/")
        await page.get_by_label("Admin API key").fill("tak_" + "A" * 46)
        await page.get_by_role("button", name="Sign in").click()
        alert = page.locator("#login-error")
        await expect(alert).to_have_attribute("role", "alert")
        await expect(alert).to_contain_text("unknown, wrong, disabled or expired")

        await sign_in(page, sc)
        await page.get_by_role("button", name="Add API Key").click()
        dialog = page.locator("#add-dialog")
        await dialog.get_by_label("Name").fill("ops")  # taken
        await role_box(dialog, "viewer").check()
        await dialog.get_by_role("button", name="Save").click()
        error = dialog.get_by_role("alert")
        await expect(error).to_contain_text("already exists")
        await expect(dialog.get_by_label("Name")).to_have_attribute("aria-invalid", "true")
        await dialog.get_by_label("Name").fill("bad name")
        await dialog.get_by_role("button", name="Save").click()
        await expect(error).to_contain_text("1-64 characters")
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        assert watch.dialogs == []
        assert watch.page_errors == []
        assert watch.foreign_requests == []
        # The only console errors are the browser's notes about the refused requests.
        assert all(re.search(r"status of 4\d\d", message) for message in watch.console_errors), watch.console_errors


EVIL_PAGE = """<!doctype html>
<title>waiting</title>
<form id="f" method="post" action="{admin}/admin/api/keys/{key_id}/disable"><button>go</button></form>
<script>
fetch("{admin}/admin/api/keys/{key_id}/disable", {{method: "POST", credentials: "include"}})
  .then((r) => {{ document.title = "answered " + r.status; }})
  .catch(() => {{ document.title = "blocked"; }});
</script>
"""


@asynccontextmanager
async def evil_site(html: str) -> AsyncIterator[int]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_cross_site_page_cannot_use_the_admin_session(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (context, page, watch):
        victim = await sc.create_key("victim", ["viewer"])
        await sign_in(page, sc)
        await expect(key_row(page, "victim").locator("td").nth(3)).to_have_text("Enabled")
        html = EVIL_PAGE.format(admin=sc.admin_origin, key_id=victim["id"])
        # "localhost" and "127.0.0.1" are different sites: the attacker page is cross-site.
        async with evil_site(html) as port:
            evil = await context.new_page()
            await evil.goto(f"http://localhost:{port}/")
            await expect(evil).to_have_title(re.compile("answered|blocked"))
            # A classic form POST (top-level navigation) from the attacker's page. It must really
            # be sent and refused: a click that never happened would prove nothing.
            disable_url = f"{sc.admin_origin}/admin/api/keys/{victim['id']}/disable"
            async with evil.expect_response(
                    lambda r: r.url == disable_url and r.request.method == "POST"
                    and r.request.is_navigation_request(), timeout=10_000) as answered:
                await evil.locator("#f button").click()
            refused = await answered.value
            assert refused.status in (401, 403), refused.status
            await evil.close()
        _, record, _ = await sc.call("GET", f"/keys/{victim['id']}")
        assert record["status"] == "enabled"
        _, audit, _ = await sc.call("GET", "/audit")
        assert not [e for e in audit["events"] if e["action"] == "key.disabled"]
        # The real page still works with its session afterwards.
        await page.reload()
        await expect(key_row(page, "victim").locator("td").nth(3)).to_have_text("Enabled")
        watch.assert_clean()


# ---- a key's activity, the audit filters, roles ------------------------------------------------


async def record_calls(sc: AdminSidecar, key: dict[str, Any], calls: list[tuple[str, str]]) -> None:
    """``tool.called`` events through the running sidecar's recorder (what the proxy calls for each
    ``tools/call``), written at once."""
    for tool, outcome in calls:
        sc.services.activity.tool_called(key_id=key["id"], key_name=key["name"], tool=tool, outcome=outcome,
                                         client="192.0.2.10")
    await sc.services.activity.flush()


async def test_a_keys_activity_shows_its_recent_calls_and_calls_per_tool(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        agent = await sc.create_key("busy-agent", ["viewer"])
        other = await sc.create_key("other-agent", ["viewer"])
        await record_calls(sc, agent, [("get_plan", "allowed")] * 3 + [("delete_plan", "denied")] * 2)
        await record_calls(sc, other, [("secret_tool", "allowed")])
        await sign_in(page, sc)

        await key_row(page, "busy-agent").click(button="right")
        await page.get_by_role("menuitem", name="Activity").click()
        dialog = page.get_by_role("dialog", name="Activity of busy-agent")
        await expect(dialog).to_be_visible()
        await expect(dialog.locator("#activity-summary")).to_have_text("5 tool calls in the last 24 hours, 2 denied.")
        tools = dialog.get_by_role("table", name="Calls per tool, last 24 hours")
        await expect(tools.locator("tbody tr")).to_have_count(2)
        assert [" ".join(text.split()) for text in await tools.locator("tbody tr").all_inner_texts()] == [
            "get_plan 3 0", "delete_plan 0 2"]
        recent = dialog.get_by_role("table", name="Recent calls")
        await expect(recent.locator("tbody tr")).to_have_count(5)
        newest = recent.locator("tbody tr").first.locator("td")
        await expect(newest.nth(1)).to_have_text("delete_plan")
        await expect(newest.nth(2)).to_have_text("Denied")
        await expect(newest.nth(3)).to_have_text("192.0.2.10")
        _, stored, _ = await sc.call("GET", f"/keys/{agent['id']}/activity")
        await expect(newest.nth(0).locator("time")).to_have_attribute("datetime", stored["recent"][0]["time"])
        await expect(recent.locator("tbody tr").last.locator("td").nth(2)).to_have_text("Allowed")
        assert "secret_tool" not in await dialog.inner_text()

        # Escape closes it and gives focus back to the key's row (the cell the menu came from).
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        await expect(key_row(page, "busy-agent").locator(":focus")).to_have_count(1)

        # A key without calls says so.
        await key_row(page, "other-agent").click(button="right")
        await page.get_by_role("menuitem", name="Activity").click()
        dialog = page.get_by_role("dialog", name="Activity of other-agent")
        await expect(dialog.locator("#activity-summary")).to_have_text("1 tool call in the last 24 hours, 0 denied.")
        await page.get_by_role("button", name="Close").click()
        await key_row(page, "ops").click(button="right")
        await page.get_by_role("menuitem", name="Activity").click()
        dialog = page.get_by_role("dialog", name="Activity of ops")
        await expect(dialog.get_by_text("No tool calls in the last 24 hours.", exact=True).first).to_be_visible()
        await expect(dialog.get_by_text("No tool calls recorded.")).to_be_visible()
        await expect(dialog.get_by_role("table")).to_have_count(0)
        watch.assert_clean()


async def test_activity_from_the_keyboard_leads_to_the_filtered_audit(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        agent = await sc.create_key("kbd-agent", ["viewer"])
        other = await sc.create_key("other-agent", ["viewer"])
        await record_calls(sc, agent, [("get_plan", "allowed"), ("delete_plan", "denied")])
        await record_calls(sc, other, [("get_plan", "allowed")])
        await sign_in(page, sc)

        # Shift+F10 on the row, down to Activity, Enter: the dialog opens with focus inside it
        # and its summary is announced.
        await key_row(page, "kbd-agent").get_by_role("button", name="kbd-agent", exact=True).focus()
        await page.keyboard.press("Shift+F10")
        await page.keyboard.press("ArrowDown")
        await expect(page.get_by_role("menuitem", name="Activity")).to_be_focused()
        await page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Activity of kbd-agent")
        await expect(dialog).to_be_visible()
        await expect(dialog.get_by_role("button", name="Close")).to_be_focused()
        await expect(page.locator("#announcer")).to_have_text(
            "Activity of kbd-agent: 2 tool calls in the last 24 hours, 1 denied.")

        # Shift+Tab to "Show in Audit", Enter: the Audit tab, filtered to this key's tool calls.
        await page.keyboard.press("Shift+Tab")
        await expect(dialog.get_by_role("button", name="Show in Audit")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(dialog).to_be_hidden()
        audit_tab = page.get_by_role("tab", name="Audit")
        await expect(audit_tab).to_have_attribute("aria-selected", "true")
        await expect(audit_tab).to_be_focused()
        action = page.get_by_label("Action", exact=True)
        key = page.get_by_label("Key", exact=True)
        await expect(action).to_have_value("tool.called")
        await expect(key).to_have_value(agent["id"])
        rows = page.locator("#audit-body tr")
        await expect(rows).to_have_count(2)
        texts = await rows.all_inner_texts()
        assert all("Tool called" in t and "kbd-agent" in t for t in texts), texts
        assert "delete_plan · denied" in texts[0] and "get_plan · allowed" in texts[1]

        # Every action of this key; then every key's tool calls; then nothing filtered.
        await action.select_option("")
        await expect(rows).to_have_count(3)
        assert "Key created" in (await rows.all_inner_texts())[-1]
        await action.select_option("tool.called")
        await key.select_option("")
        await expect(rows).to_have_count(3)
        assert {t.split("\t")[3] for t in await rows.all_inner_texts()} == {"kbd-agent", "other-agent"}
        await action.select_option("key.disabled")
        await expect(page.get_by_text("No events yet.")).to_be_visible()
        await expect(page.locator("#announcer")).to_have_text("No matching events.")
        watch.assert_clean()


async def test_roles_tab_shows_each_roles_tool_patterns(tmp_path: Path, browser: Browser) -> None:
    roles = {"viewer": {"tools": ["get_*", "search_plans"]}, "writer": {"tools": []}}
    async with admin_sidecar(tmp_path, roles=roles) as sc, admin_page(browser, sc) as (_, page, watch):
        await sign_in(page, sc)
        await page.get_by_role("tab", name="Audit").click()
        await page.keyboard.press("ArrowRight")  # the tabs pattern: arrows move between tabs
        roles_tab = page.get_by_role("tab", name="Roles")
        await expect(roles_tab).to_be_focused()
        await expect(roles_tab).to_have_attribute("aria-selected", "true")
        table = page.locator("#roles-table")
        await expect(table).to_be_visible()

        def row(name: str) -> Locator:
            return table.locator("tbody tr", has=page.get_by_role("rowheader", name=name, exact=True))

        await expect(row("viewer").locator(".pill-pattern")).to_have_text(["get_*", "search_plans"])
        await expect(row("viewer").locator("td").nth(2)).to_have_attribute(
            "aria-label", "Tool patterns: get_*, search_plans")
        await expect(row("writer").locator("td").nth(2)).to_have_text("No tools")
        await expect(row("org-admin").locator("td").nth(2)).to_have_text("All tools")
        await expect(row("org-admin").locator("td").nth(1)).to_have_text("org:settings")
        # The Add API Key form tells the same about each role it offers (the role's description).
        await page.get_by_role("tab", name="API Keys").click()
        await page.get_by_role("button", name="Add API Key").click()
        viewer = role_box(page.locator("#add-dialog"), "viewer")
        await expect(viewer).to_have_accessible_description(re.compile(r"plans:read · tools: get_\*, search_plans$"))
        await expect(role_box(page.locator("#add-dialog"), "writer")).to_have_accessible_description(
            re.compile(r"tools: none$"))
        watch.assert_clean()


async def test_key_details_recent_calls_come_from_the_activity_endpoint(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        agent = await sc.create_key("busy-agent", ["viewer"])
        await record_calls(sc, agent, [("get_plan", "allowed")] * 2 + [("delete_plan", "denied")])
        await sign_in(page, sc)

        # View details: its Recent calls section lists the key's tool calls, newest first, with
        # the 24-hour summary the Activity dialog shows.
        await key_row(page, "busy-agent").get_by_role("button", name="busy-agent", exact=True).click()
        section = page.locator("#detail-dialog #key-activity")
        await expect(section).to_contain_text("3 tool calls in the last 24 hours, 1 denied.")
        items = section.locator("li")
        await expect(items).to_have_count(3)
        await expect(items.first).to_contain_text("delete_plan")
        await expect(items.first).to_contain_text("denied")
        await expect(items.last).to_contain_text("get_plan")
        await page.get_by_role("button", name="Close").click()

        # A sidecar whose API document lists no activity endpoint is never asked for it.
        async def without_activity(route: Route) -> None:
            response = await route.fetch()
            document = await response.json()
            document["paths"].pop("/admin/api/keys/{id}/activity")
            await route.fulfill(response=response, json=document)

        await page.route("**/admin/api/openapi.json", without_activity)
        await page.reload()
        before = len(watch.requests)
        await key_row(page, "busy-agent").get_by_role("button", name="busy-agent", exact=True).click()
        await expect(section).to_contain_text("No activity recorded.")
        assert not [url for url in watch.requests[before:] if url.endswith("/activity")]
        watch.assert_clean()


async def test_the_page_manages_only_the_signed_in_keys_workspace(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path, workspaces={"from_host": "{workspace}.toolio.test"}) as sc:
        for workspace in ("acme", "globex"):
            await sc.services.keys.create(name=f"{workspace}-agent", roles=["viewer"], actor="cli", client=None,
                                          workspace=workspace)
        async with admin_page(browser, sc) as (_, page, _):
            await sign_in(page, sc)
            await expect(page.locator("#workspace")).to_have_text("acme")
            await expect(key_row(page, "acme-agent")).to_be_visible()
            await expect(key_row(page, "globex-agent")).to_have_count(0)
            await page.get_by_role("searchbox").fill("agent")
            await expect(key_row(page, "acme-agent")).to_be_visible()
            await expect(key_row(page, "globex-agent")).to_have_count(0)
