"""Cold start: N distinct valid keys at once from one address, just after a restart.

    .venv/bin/python bench/cold_start.py                # 200 keys, SQLite store
    .venv/bin/python bench/cold_start.py --keys 500 --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

A real ``toolio-sidecar serve`` process with the *default* settings that matter here: argon2id
at its default cost, two verification slots, a queue of 1024, and the default failure budgets
(30 failures a minute per address), in front of a trivial upstream. N keys are created through
the admin API, the sidecar is restarted (its verified-key cache is empty), and all N are sent at
once from one client address, as agents behind one NAT or behind an ingress not listed in
``proxy.trusted_proxies`` would after a rolling deploy. Reported: the time until every request
was answered, the answers that were not 200 (by status), per-request latency, and the queue
metrics scraped from the admin listener. A measurement, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from replicas import HOST, Sidecar, pct, trivial_upstream  # bench/ is on sys.path when run


async def create_keys(sidecar: Sidecar, admin_key: str, count: int) -> list[str]:
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with aiohttp.ClientSession() as http:
        tokens = []
        for index in range(count):
            async with http.post(f"http://{HOST}:{sidecar.admin_port}/admin/api/keys", headers=admin,
                                 json={"name": f"cold-{index}", "roles": ["viewer"]}) as resp:
                assert resp.status == 201, (resp.status, await resp.text())
                tokens.append((await resp.json())["key"])
        return tokens


async def burst(sidecar: Sidecar, tokens: list[str]) -> tuple[float, list[tuple[int, float]]]:
    """Every token at once, each on its own connection from 127.0.0.1; (wall time, answers)."""
    answers: list[tuple[int, float]] = []
    connector = aiohttp.TCPConnector(limit=0, local_addr=(HOST, 0))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:

        async def one(token: str) -> None:
            started = time.perf_counter()
            async with http.post(f"http://{HOST}:{sidecar.port}/mcp", data=b"{}",
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                answers.append((resp.status, time.perf_counter() - started))

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in tokens))
        return time.perf_counter() - started, answers


async def queue_metrics(sidecar: Sidecar) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://{HOST}:{sidecar.admin_port}/metrics") as resp:
        text = await resp.text()
    wanted = {f"toolio_sidecar_{name}_{part}" for name in ("verification_queue_wait_seconds", "argon2_verify_seconds")
              for part in ("count", "sum")}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name] = sample.value
            elif sample.name == "toolio_sidecar_auth_failures_total" and sample.value:
                found[f"auth_failures{{reason={sample.labels['reason']}}}"] = sample.value
    return found


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="toolio-cold-start-"))
    runner, upstream = await trivial_upstream()
    database = f"toolio_cold_{os.getpid()}"
    server: Any = None
    store_url: str | None = None
    if args.postgres_url:
        import asyncpg

        server = await asyncpg.connect(args.postgres_url)
        await server.execute(f"CREATE DATABASE {database}")
        store_url = args.postgres_url.rsplit("/", 1)[0] + "/" + database
    sidecar = Sidecar(tmp, "sidecar", upstream, store_url)
    try:
        admin_key = sidecar.cli("keys", "create", "--name", "ops", "--role", "org-admin")["key"]
        await sidecar.start()
        made = time.perf_counter()
        tokens = await create_keys(sidecar, admin_key, args.keys)
        made = time.perf_counter() - made
        sidecar.stop()
        await sidecar.start()  # the restart: an empty verified-key cache
        wall, answers = await burst(sidecar, tokens)
        metrics = await queue_metrics(sidecar)
    finally:
        sidecar.stop()
        await runner.cleanup()
        if server is not None:
            await server.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            await server.close()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    statuses = Counter(status for status, _ in answers)
    latencies = [seconds * 1000 for _, seconds in answers]
    store = "PostgreSQL" if store_url else "SQLite"
    argon2_runs = metrics.get("toolio_sidecar_argon2_verify_seconds_count", 0.0)
    argon2_mean = metrics.get("toolio_sidecar_argon2_verify_seconds_sum", 0.0) / max(argon2_runs, 1) * 1000
    waits = metrics.get("toolio_sidecar_verification_queue_wait_seconds_count", 0.0)
    wait_mean = metrics.get("toolio_sidecar_verification_queue_wait_seconds_sum", 0.0) / max(waits, 1) * 1000
    print(f"cold start, {args.keys} distinct keys at once from one address ({store}, default argon2, "
          f"{os.cpu_count()} CPUs; {args.keys} keys created in {made:.1f} s)")
    print(f"  all answered in {wall:.2f} s; answers: "
          + ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items())))
    print(f"  non-200: {sum(c for s, c in statuses.items() if s != 200)}")
    print(f"  per request: p50 {pct(latencies, 0.5):.0f} ms, p99 {pct(latencies, 0.99):.0f} ms, "
          f"max {max(latencies):.0f} ms")
    print(f"  argon2: {argon2_runs:.0f} runs, mean {argon2_mean:.1f} ms; queue wait: mean {wait_mean:.0f} ms "
          f"over {waits:.0f} verifications")
    failures = {k: v for k, v in metrics.items() if k.startswith("auth_failures")}
    print(f"  auth failures: {failures or 'none'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--postgres-url", default="", help="use a fresh database on this server, not SQLite")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, log)")
    sys.exit(asyncio.run(main(parser.parse_args())))
