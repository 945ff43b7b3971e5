"""The admin page with many keys, in real Chromium: time to the first table paint and to a filter.

Sets up a workspace of ``--keys`` keys (put straight into the SQLite store, with a fixed hash:
making 10,000 argon2 hashes would only time argon2), runs ``toolio-sidecar serve`` on it, signs
the page in, and then, ``--rounds`` times:

* **first paint**: reload the signed-in page; the time from navigation start to the first
  ``toolio:keys-rendered`` mark (the page sets it once a page of keys is in the table);
* **search**: type a name fragment; the time from the last keystroke to the table showing the
  matches (this includes the page's pause after typing, 150 ms, before it asks);
* **filter**: pick Status = Disabled; from the change to the filtered table;
* **next page**: press Next; from the click to the next page in the table.

Times come from the page's own performance marks (``toolio:keys-requested`` when a query is
sent, ``toolio:keys-rendered`` when its rows are in the table). This is a measurement, not a test:
nothing here asserts (tests/admin/test_admin_page_keys.py checks the behaviour).

Run from the repository root:
    .venv/bin/python bench/admin_page.py [--keys 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, async_playwright

from sidecar.keys.records import DISABLED, ENABLED, KeyRecord
from sidecar.keys.store.sqlite import SQLiteKeyStore

CONFIG = """workspace = "acme"
data_dir = "{data_dir}"
[proxy]
listen = "127.0.0.1:{proxy_port}"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:{admin_port}"
[roles.viewer]
description = "Read planning data"
permissions = ["plans:read"]
[roles.writer]
description = "Read and change plans"
permissions = ["plans:read", "plans:write"]
[roles.org-admin]
description = "Access organization settings, including API keys"
permissions = ["org:settings"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def records(count: int) -> list[KeyRecord]:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return [KeyRecord(id=f"key_{n:016d}", lookup_id=f"B{n:07d}", name=f"integration-{n:05d}",
                      roles=("viewer", "writer") if n % 3 == 0 else ("viewer",), workspace="acme",
                      status=DISABLED if n % 10 == 0 else ENABLED, created_at=start + timedelta(minutes=n),
                      created_by="bench", key_hash="$argon2id$bench",
                      last_used_at=start + timedelta(days=30, seconds=n) if n % 2 else None)
            for n in range(1, count + 1)]


async def marks(page: Page, name: str) -> list[float]:
    found: list[float] = await page.evaluate(
        "(name) => performance.getEntriesByName(name).map((e) => e.startTime)", name)
    return found


async def settled(page: Page) -> None:
    await page.wait_for_function("() => !document.getElementById('keys-table').hasAttribute('aria-busy')")


async def timed_query(page: Page, action: Any) -> float:
    """Run ``action`` (which starts one query) and return ms from its request mark to its render."""
    before = len(await marks(page, "toolio:keys-rendered"))
    await action()
    await page.wait_for_function(
        "(n) => performance.getEntriesByName('toolio:keys-rendered').length > n", arg=before)
    await settled(page)
    requested = (await marks(page, "toolio:keys-requested"))[-1]
    return (await marks(page, "toolio:keys-rendered"))[-1] - requested


async def measure(admin: str, key: str, rounds: int, chromium: str) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"first paint": [], "search": [], "filter": [], "next page": []}
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True,
                                                   args=["--no-sandbox", "--disable-gpu"])
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        await page.goto(admin + "/admin/")
        await page.get_by_label("Admin API key").fill(key)
        await page.get_by_role("button", name="Sign in").click()
        await page.locator("#keys-body tr").first.wait_for()

        async def pick_disabled() -> None:
            await page.get_by_label("Status").select_option("disabled")

        for _ in range(rounds):
            await page.reload()
            await page.locator("#keys-body tr").first.wait_for()
            await settled(page)
            results["first paint"].append((await marks(page, "toolio:keys-rendered"))[0])

            search = page.get_by_label("Search keys by name")
            rendered = len(await marks(page, "toolio:keys-rendered"))
            await search.focus()
            await page.keyboard.type("integration-0777", delay=40)
            await page.wait_for_function(
                "(n) => performance.getEntriesByName('toolio:keys-rendered').length > n", arg=rendered)
            await settled(page)
            typed = (await marks(page, "toolio:search-input"))[-1]
            results["search"].append((await marks(page, "toolio:keys-rendered"))[-1] - typed)

            await search.fill("")
            await search.press("Enter")
            await settled(page)
            results["filter"].append(await timed_query(page, pick_disabled))
            results["next page"].append(await timed_query(page, page.get_by_role("button", name="Next").click))
            await page.get_by_label("Status").select_option("")
            await settled(page)
        await browser.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        admin_port = free_port()
        config = root / "config.toml"
        config.write_text(CONFIG.format(data_dir=root / "data", proxy_port=free_port(), admin_port=admin_port))
        created = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "keys", "create", "--config", str(config), "--name", "ops",
            "--role", "org-admin", "--json", stdout=asyncio.subprocess.PIPE)
        out, _ = await created.communicate()
        key = json.loads(out)["key"]
        store = SQLiteKeyStore(root / "data" / "sidecar.db")
        await store.open()
        started = time.perf_counter()
        await store.import_records(records(args.keys), [])
        print(f"{args.keys} keys stored in {time.perf_counter() - started:.1f} s")
        await store.close()
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        admin = f"http://127.0.0.1:{admin_port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    try:
                        async with http.get(admin + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
            results = await measure(admin, key, args.rounds, args.chromium)
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 10)
    print(f"\nAdmin page, {args.keys} keys, {args.rounds} rounds (ms; median, min-max):")
    for name, values in results.items():
        print(f"  {name:<12} {statistics.median(values):7.1f}   {min(values):.1f}-{max(values):.1f}")


if __name__ == "__main__":
    asyncio.run(main())
