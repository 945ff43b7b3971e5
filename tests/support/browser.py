"""The admin page in real Chromium (Playwright): one browser per test module, a fresh context per
test, a :class:`Watch` on what the page must never do, and the steps every page test shares
(sign in, find a key's row, add a key, read pixels of a screenshot).

A test module imports :func:`browser` (a module-scoped fixture) and marks itself
``pytest.mark.asyncio(loop_scope="module")`` so the browser serves all its tests.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import pytest_asyncio
from PIL import Image
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Request,
    async_playwright,
    expect,
)

from tests.support.admin import AdminSidecar

CHROMIUM = "/usr/bin/chromium"
KEY_SHAPE = re.compile(r"tak_[0-9A-Za-z]{46}")
WIDE = {"width": 1280, "height": 860}
NARROW = {"width": 390, "height": 844}  # a current phone, portrait

if not Path(CHROMIUM).exists():  # pragma: no cover - scripts/test installs it; never a silent pass
    pytest.fail("Chromium is not installed at /usr/bin/chromium: apt-get install -y chromium "
                "(scripts/test does it as root)", pytrace=False)


@dataclass
class Watch:
    """What a page did that it should not: console errors, uncaught exceptions, native dialogs
    (window.alert), and requests to anywhere but the admin origin."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("dialog", self._dialog)
        page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)
        if not request.url.startswith(self.origin + "/"):
            self.foreign_requests.append(request.url)

    def assert_clean(self) -> None:
        assert self.console_errors == []
        assert self.page_errors == []
        assert self.dialogs == []
        assert self.foreign_requests == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module (launching costs seconds); each test gets its own context."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def admin_page(browser: Browser, sc: AdminSidecar, *, viewport: dict[str, int] | None = None,
                     color_scheme: Literal["light", "dark"] = "light",
                     ) -> AsyncIterator[tuple[BrowserContext, Page, Watch]]:
    context = await browser.new_context(viewport=viewport or WIDE, color_scheme=color_scheme)  # type: ignore[arg-type]
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=sc.admin_origin)
    page = await context.new_page()
    watch = Watch(sc.admin_origin)
    watch.attach(page)
    try:
        yield context, page, watch
    finally:
        await context.close()


async def sign_in(page: Page, sc: AdminSidecar) -> None:
    await page.goto(sc.admin_origin + "/admin")
    assert page.url == sc.admin_origin + "/admin/"
    key_input = page.get_by_label("Admin API key")
    await expect(key_input).to_be_visible()
    assert await key_input.get_attribute("type") == "password"
    await key_input.fill(sc.admin_key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="API Keys")).to_be_visible()
    await expect(page.locator("#actor")).to_have_text("ops")


def key_row(page: Page, name: str) -> Locator:
    name_cell = page.locator(".key-name", has_text=re.compile(f"^{re.escape(name)}$"))
    return page.locator("#keys-body tr", has=name_cell)


def role_box(scope: Page | Locator, role: str) -> Locator:
    return scope.get_by_role("checkbox", name=role, exact=True)


async def add_key(page: Page, name: str, roles: list[str]) -> str:
    await page.get_by_role("button", name="Add API Key").click()
    dialog = page.locator("#add-dialog")
    await expect(dialog).to_be_visible()
    await dialog.get_by_label("Name").fill(name)
    for role in roles:
        await role_box(dialog, role).check()
    await dialog.get_by_role("button", name="Save").click()
    shown = page.locator("#key-dialog")
    await expect(shown).to_be_visible()
    value = await shown.locator("input").input_value()
    assert KEY_SHAPE.fullmatch(value)
    return value


# -- pixels ---------------------------------------------------------------------------------------

RGB = tuple[int, int, int]


def _luminance(color: RGB) -> float:
    # WCAG 2.x relative luminance (https://www.w3.org/TR/WCAG21/#dfn-relative-luminance).
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: RGB, b: RGB) -> float:
    """WCAG 2.x contrast ratio of two colours, 1 to 21."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def pixels(png: bytes) -> list[RGB]:
    with Image.open(io.BytesIO(png)) as image:
        return list(image.convert("RGB").getdata())


def painted_text_contrast(png: bytes) -> float:
    """The contrast between the most common colour of a screenshot of some text (its background)
    and the colour furthest from it (the glyphs' cores): what a reader actually sees, whatever
    the browser painted (its own selection colours included)."""
    colors = pixels(png)
    background = Counter(colors).most_common(1)[0][0]
    return max(contrast(background, c) for c in set(colors))


def mean_luminance(png: bytes) -> float:
    colors = pixels(png)
    return sum(_luminance(c) for c in colors[::7]) / len(colors[::7])
