"""The admin page in real Chromium (Playwright), against a real sidecar, SQLite file and MCP
upstream: sign in, add a key and copy it once, disable / enable from the context menu by mouse
and by keyboard, the audit view, logout, and a cross-site page that tries to use the session.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Browser, expect

from tests.support.admin import admin_sidecar
from tests.support.browser import add_key, admin_page, browser, key_row, role_box, sign_in
from tests.support.mcp import mcp_client, mcp_url

# One event loop for the module, so the shared browser fixture can serve every test.
pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]  # the module-scoped fixture, used by name


async def test_add_key_copy_once_and_toggle_it_from_the_context_menu(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path, upstream=True) as sc, admin_page(browser, sc) as (_, page, watch):
        await sign_in(page, sc)
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
        await expect(menu.get_by_role("menuitem")).to_have_text(["View details", "Rotate…", "Disable"])
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
        texts = await audit.all_inner_texts()
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

        # Shift+F10, End to Disable, Enter.
        await page.keyboard.press("Shift+F10")
        await expect(menu).to_be_visible()
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
        await page.keyboard.press("End")
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
