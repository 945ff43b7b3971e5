"""How the admin page looks, from screenshots in real Chromium: light and dark colour schemes
(``prefers-color-scheme``), a phone (390 px) and a desktop width. Nothing scrolls sideways, every
row keeps its Status and actions on screen, and text is readable where it is painted (WCAG 2.x
contrast of at least 4.5:1, measured on the screenshot's pixels, so colours the browser paints
itself, such as a focused selection, count too). The screenshots are kept in the test's
temporary directory for a look by eye."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from sidecar.keys.records import DISABLED, utcnow
from tests.support.admin import AdminSidecar, admin_sidecar
from tests.support.browser import (
    NARROW,
    WIDE,
    admin_page,
    browser,
    mean_luminance,
    painted_text_contrast,
    role_box,
    sign_in,
)
from tests.support.records import key_record

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["browser"]  # the module-scoped fixture, used by name

LONGEST_NAME = "integration-" + "x" * 40 + "-production"  # 63 characters, no break opportunity
WCAG_AA = 4.5


async def add_varied_keys(sc: AdminSidecar) -> None:
    now = utcnow()
    records = [
        replace(key_record(1, name=LONGEST_NAME), roles=("viewer", "writer", "org-admin"), created_at=now),
        replace(key_record(2, name="expiring-soon"), expires_at=now + timedelta(days=3), created_at=now),
        replace(key_record(3, name="old-disabled"), status=DISABLED, disabled_at=now, created_at=now),
        replace(key_record(4, name="used-yesterday"), last_used_at=now - timedelta(days=1), created_at=now),
    ]
    await sc.services.store.import_records(records, [])
    await sc.call("POST", f"/keys/{key_record(4).id}/disable")
    await sc.call("POST", f"/keys/{key_record(4).id}/enable")


async def assert_readable(locator: Locator, what: str) -> None:
    ratio = painted_text_contrast(await locator.screenshot())
    assert ratio >= WCAG_AA, f"{what}: contrast {ratio:.2f}"


async def assert_no_sideways_scroll(page: Page) -> None:
    """Neither the page nor a visible table is wider than what holds it (a table clipped by its
    card would cut columns off just the same)."""
    widths = await page.evaluate("""() => [
        [document.documentElement.scrollWidth, window.innerWidth],
        ...Array.from(document.querySelectorAll('table'))
            .filter((t) => t.getClientRects().length > 0)
            .map((t) => [t.scrollWidth, t.closest('.card').clientWidth])]""")
    for inner, outer in widths:
        assert inner <= outer, widths


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize(("size", "viewport"), [("narrow", NARROW), ("wide", WIDE)])
async def test_the_page_is_readable_light_and_dark_on_a_phone_and_a_desktop(
        tmp_path: Path, browser: Browser, scheme: str, size: str, viewport: dict[str, int]) -> None:
    async with (admin_sidecar(tmp_path) as sc,
                admin_page(browser, sc, viewport=viewport, color_scheme=scheme) as (_, page, watch)):  # type: ignore[arg-type]
        await add_varied_keys(sc)
        await sign_in(page, sc)
        rows = page.locator("#keys-body tr")
        await expect(rows).to_have_count(5)
        await page.screenshot(path=tmp_path / f"keys-{scheme}-{size}.png", full_page=True)

        # Painted in the scheme asked for (backgrounds and all, not only the text).
        luminance = mean_luminance(await page.screenshot())
        assert luminance < 0.1 if scheme == "dark" else luminance > 0.6, luminance

        # Nothing scrolls sideways; every row's Status and ⋯ button are whole and on screen.
        await assert_no_sideways_scroll(page)
        width = viewport["width"]
        for index in range(await rows.count()):
            row = rows.nth(index)
            for part in (row.locator("td.col-status .badge"), row.locator(".actions-button")):
                await expect(part).to_be_visible()
                box = await part.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (index, box)
        # The longest name wraps inside its cell instead of widening the table.
        long_row = rows.filter(has_text=LONGEST_NAME)
        assert (await long_row.locator(".key-name").bounding_box() or {"width": 1e9})["width"] < width

        # Text is readable where it is painted.
        first = rows.first
        await assert_readable(first.locator(".key-name"), "key name")
        await assert_readable(first.locator(".badge"), "status badge")
        await assert_readable(page.locator("#keys-table th").first, "column header")
        await assert_readable(page.locator("#keys-range"), "range line")
        await assert_readable(rows.filter(has_text="old-disabled").locator(".badge"), "disabled badge")
        await assert_readable(rows.filter(has_text="old-disabled").locator(".key-name"), "disabled key name")
        await assert_readable(rows.filter(has_text="expiring-soon").locator(".status-note"), "expiry note")
        if size == "wide":
            await assert_readable(long_row.locator(".pill").first, "role pill")
            await assert_readable(rows.filter(has_text="used-yesterday").locator("td.col-used"), "last used")
        else:
            await assert_readable(long_row.locator(".name-roles"), "roles under the name")

        # The Add dialog: a checked role keeps its text readable while the list has focus.
        await page.get_by_role("button", name="Add API Key").click()
        dialog = page.locator("#add-dialog")
        await role_box(dialog, "viewer").check()
        await expect(role_box(dialog, "viewer")).to_be_focused()
        await page.screenshot(path=tmp_path / f"add-{scheme}-{size}.png")
        checked = dialog.locator(".check", has=role_box(page, "viewer"))
        await assert_readable(checked.locator(".check-name"), "checked role name")
        await assert_readable(checked.locator(".check-hint"), "checked role description")
        await assert_readable(dialog.locator(".check", has=role_box(page, "writer")).locator(".check-name"),
                              "unchecked role name")
        await assert_no_sideways_scroll(page)
        await dialog.get_by_role("button", name="Cancel").click()

        # The audit view: "Key disabled" has a colour of its own, not the grey of disabled text.
        await page.get_by_role("tab", name="Audit").click()
        disabled = page.locator(".action", has_text="Key disabled").first
        await expect(disabled).to_be_visible()
        await page.screenshot(path=tmp_path / f"audit-{scheme}-{size}.png", full_page=True)
        colors = await page.evaluate("""() => [
            getComputedStyle(document.querySelector('.action-off')).color,
            getComputedStyle(document.querySelector('#panel-audit .muted')).color,
            getComputedStyle(document.querySelector('.action-on')).color]""")
        assert colors[0] != colors[1], colors
        assert colors[0] != colors[2], colors
        await assert_readable(disabled, "Key disabled")
        await assert_readable(page.locator(".action", has_text="Key enabled").first, "Key enabled")
        await assert_no_sideways_scroll(page)
        watch.assert_clean()


async def test_a_field_error_goes_away_once_the_field_is_edited(tmp_path: Path, browser: Browser) -> None:
    async with admin_sidecar(tmp_path) as sc, admin_page(browser, sc) as (_, page, watch):
        await sign_in(page, sc)
        await page.get_by_role("button", name="Add API Key").click()
        dialog = page.locator("#add-dialog")
        error = dialog.get_by_role("alert")
        name = dialog.get_by_label("Name")
        await dialog.get_by_role("button", name="Save").click()
        await expect(error).to_have_text("Enter a name for the key.")
        await expect(name).to_have_attribute("aria-invalid", "true")
        await expect(name).to_be_focused()
        # Changing another field leaves the error about the name in place...
        await role_box(dialog, "viewer").check()
        await expect(error).to_have_text("Enter a name for the key.")
        # ...typing a name clears it.
        await name.focus()
        await page.keyboard.type("c")
        await expect(error).to_be_hidden()
        await expect(name).not_to_have_attribute("aria-invalid", "true")

        await role_box(dialog, "viewer").uncheck()
        await dialog.get_by_role("button", name="Save").click()
        await expect(error).to_have_text("Pick at least one role.")
        await expect(dialog.locator("#key-roles")).to_have_attribute("aria-invalid", "true")
        await role_box(dialog, "viewer").check()
        await expect(error).to_be_hidden()
        await dialog.get_by_role("button", name="Save").click()
        await expect(page.locator("#key-dialog")).to_be_visible()
        await page.get_by_role("button", name="Done").click()
        watch.assert_clean()
