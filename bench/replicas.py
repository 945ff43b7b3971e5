"""Several replicas on one PostgreSQL store: how fast a disable reaches another replica, and how
long a restarted replica takes to serve N distinct keys (cold cache).

    .venv/bin/python bench/replicas.py                      # 100 disables, 200 cold keys
    .venv/bin/python bench/replicas.py --disables 20 --cold-keys 50

Two real `toolio-sidecar serve` processes (A and B) share a fresh database on
``--postgres-url``'s server, in front of a trivial upstream. Revocation latency: a key is
created and used on B (so B has it cached), disabled through A's admin API, and B is asked
with it every millisecond until it answers 401; the time from A's 200 to B's first 401.
Cold verify: N keys are created, B is restarted, and all N are presented to B at once from
one address; the time until every one got its 200 (argon2 at the default cost). The same cold
start runs on the SQLite store for comparison. A measurement, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Sidecar:
    def __init__(self, tmp: Path, name: str, upstream: int, store_url: str | None) -> None:
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        self.config = tmp / f"{name}.toml"
        store = f'\n[store]\nurl = "{store_url}"\n' if store_url else ""
        self.config.write_text(
            f'workspace = "bench"\ndata_dir = "{tmp / (name + "-data")}"\nlog_level = "warning"\n'
            f'[proxy]\nlisten = "{HOST}:{self.port}"\nupstream = "http://{HOST}:{upstream}"\n'
            f'[admin]\nlisten = "{HOST}:{self.admin_port}"\n'
            '[roles.viewer]\ndescription = "bench"\npermissions = ["plans:read"]\n'
            '[roles.org-admin]\ndescription = "admin"\npermissions = ["org:settings"]\n' + store)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"{name}.log"

    def cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "sidecar", *args, "--config", str(self.config), "--json"],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not on a hot path
                [sys.executable, "-m", "sidecar", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"http://{HOST}:{self.admin_port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log.name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


async def trivial_upstream() -> tuple[web.AppRunner, int]:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    return runner, port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def revocation(a: Sidecar, b: Sidecar, admin_key: str, count: int) -> list[float]:
    latencies: list[float] = []
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            async with http.post(f"http://{HOST}:{a.admin_port}/admin/api/keys", headers=admin,
                                 json={"name": f"revoke-{index}", "roles": ["viewer"]}) as resp:
                created = await resp.json()
            bearer = {"Authorization": f"Bearer {created['key']}"}
            async with http.post(f"http://{HOST}:{b.port}/mcp", headers=bearer, data=b"{}") as resp:
                assert resp.status == 200, resp.status  # cached on B now
            async with http.post(f"http://{HOST}:{a.admin_port}/admin/api/keys/{created['id']}/disable",
                                 headers=admin) as resp:
                assert resp.status == 200
                disabled_at = time.perf_counter()
            while True:
                try:
                    async with http.post(f"http://{HOST}:{b.port}/mcp", headers=bearer, data=b"{}") as resp:
                        refused = resp.status == 401
                except aiohttp.ClientError:
                    refused = True  # a request in flight at the disable is cut: its connection closes
                if refused:
                    latencies.append(time.perf_counter() - disabled_at)
                    break
                if time.perf_counter() - disabled_at > 5:
                    latencies.append(float("inf"))
                    break
                await asyncio.sleep(0.001)
    return latencies


async def cold_start(tmp: Path, upstream: int, store_url: str | None, keys: int) -> float:
    name = "cold-pg" if store_url else "cold-sqlite"
    replica = Sidecar(tmp, name, upstream, store_url)
    tokens = [replica.cli("keys", "create", "--name", f"cold-{i}", "--role", "viewer")["key"] for i in range(keys)]
    await replica.start()
    try:
        started = time.perf_counter()
        statuses: list[int] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(token: str) -> None:
                async with http.post(f"http://{HOST}:{replica.port}/mcp", data=b"{}",
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
                    statuses.append(resp.status)

            await asyncio.gather(*(one(t) for t in tokens))
        elapsed = time.perf_counter() - started
        refused = len([s for s in statuses if s != 200])
        if refused:
            print(f"  {name}: {refused} of {keys} refused ({sorted(set(statuses))})", file=sys.stderr)
        return elapsed
    finally:
        replica.stop()


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="toolio-replicas-"))
    database = f"toolio_replicas_{os.getpid()}"
    server = await asyncpg.connect(args.postgres_url)
    await server.execute(f"CREATE DATABASE {database}")
    url = args.postgres_url.rsplit("/", 1)[0] + "/" + database
    runner, upstream = await trivial_upstream()
    a, b = Sidecar(tmp, "a", upstream, url), Sidecar(tmp, "b", upstream, url)
    try:
        admin_key = a.cli("keys", "create", "--name", "ops", "--role", "org-admin")["key"]
        await a.start()
        await b.start()
        latencies = await revocation(a, b, admin_key, args.disables)
        a.stop()
        b.stop()
        cold_pg = await cold_start(tmp, upstream, url, args.cold_keys)
        cold_sqlite = await cold_start(tmp, upstream, None, args.cold_keys)
    finally:
        a.stop()
        b.stop()
        await runner.cleanup()
        await server.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await server.close()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    ms = [x * 1000 for x in latencies]
    print(f"revocation across two replicas, {len(ms)} disables: p50 {statistics.median(ms):.1f} ms, "
          f"p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms")
    print(f"cold start, {args.cold_keys} distinct keys at once from one address: "
          f"PostgreSQL {cold_pg:.2f} s, SQLite {cold_sqlite:.2f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--disables", type=int, default=100)
    parser.add_argument("--cold-keys", type=int, default=200)
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    sys.exit(asyncio.run(main(parser.parse_args())))
