"""Soak: mixed traffic through the sidecar for a bounded time; RSS and open fds must stay flat.

Run by hand (not in CI):  .venv/bin/python bench/soak.py --minutes 10

Traffic, all on loopback: valid POSTs (cache hits), requests without a key (401), wrong keys
(401, then 429 as the failure budget runs out), SSE streams opened and dropped by the client
mid-stream, and a key disabled and enabled again every few seconds through the admin API
(cache invalidation, stream cuts). Every 10 s the sidecar's RSS and open file descriptors are
sampled; the verdict compares the last minute with the first minute after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def traffic(base: str, admin: str, key: str, admin_key: str, victim_id: str, until: float) -> dict[str, int]:
    counts: dict[str, int] = {}

    def count(label: str) -> None:
        counts[label] = counts.get(label, 0) + 1

    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        async def valid() -> None:
            while time.monotonic() < until:
                async with http.post(base + "/mcp", data=b'{"jsonrpc":"2.0","id":1}', headers=auth) as r:
                    await r.read()
                    count(f"valid {r.status}")

        async def keyless() -> None:
            while time.monotonic() < until:
                async with http.post(base + "/mcp", data=b"{}") as r:
                    await r.read()
                    count(f"no key {r.status}")
                await asyncio.sleep(0.01)

        async def wrong() -> None:
            while time.monotonic() < until:
                bad = "tak_" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=46))
                async with http.post(base + "/mcp", headers={"Authorization": f"Bearer {bad}"}) as r:
                    await r.read()
                    count(f"wrong key {r.status}")
                await asyncio.sleep(0.05)

        async def streams() -> None:
            while time.monotonic() < until:
                async with http.get(base + "/sse", headers=auth) as r:
                    await r.content.readline()
                    count(f"sse {r.status}")
                # leaving the block drops the stream mid-way, as a client going away does

        async def flapper() -> None:
            admin_auth = {"Authorization": f"Bearer {admin_key}"}
            while time.monotonic() < until:
                for verb in ("disable", "enable"):
                    async with http.post(f"{admin}/admin/api/keys/{victim_id}/{verb}", headers=admin_auth) as r:
                        count(f"{verb} {r.status}")
                    await asyncio.sleep(2)

        await asyncio.gather(valid(), valid(), keyless(), wrong(), streams(), streams(), flapper())
    return counts


async def drive(port: int, admin_port: int, keys: dict[str, dict[str, str]], pid: int,
                minutes: float) -> tuple[list[tuple[float, int, int]], dict[str, int]]:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    until = time.monotonic() + minutes * 60
    run = asyncio.create_task(traffic(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}",
                                      keys["agent"]["key"], keys["ops"]["key"], keys["victim"]["id"], until))
    samples: list[tuple[float, int, int]] = []
    start = time.monotonic()
    print("  time   RSS KiB   fds", flush=True)
    while not run.done():
        await asyncio.wait({run}, timeout=10)
        rss, fds = sample(pid)
        samples.append((time.monotonic() - start, rss, fds))
        print(f"{samples[-1][0]:6.0f}  {rss:8d}  {fds:4d}", flush=True)
    return samples, run.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="toolio-soak-"))
    up_port, port, admin_port = free_port(), free_port(), free_port()
    config = tmp / "sidecar.toml"
    config.write_text(
        f'workspace = "soak"\ndata_dir = "{tmp}"\n'
        f'[proxy]\nlisten = "127.0.0.1:{port}"\nupstream = "http://127.0.0.1:{up_port}"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        '[roles.viewer]\ndescription = "soak"\npermissions = ["plans:read"]\n'
        '[roles.org-admin]\ndescription = "soak"\npermissions = ["org:settings"]\n')
    cli = [PY, "-m", "sidecar"]
    keys: dict[str, dict[str, str]] = {}
    for name, role in (("agent", "viewer"), ("victim", "viewer"), ("ops", "org-admin")):
        out = subprocess.run([*cli, "keys", "create", "--config", str(config), "--name", name, "--role", role,
                              "--json"], cwd=REPO, capture_output=True, text=True, check=True)
        keys[name] = json.loads(out.stdout)
    upstream = subprocess.Popen([PY, "-m", "bench.upstream", "--port", str(up_port)], cwd=REPO)
    sidecar = subprocess.Popen([*cli, "serve", "--config", str(config)], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        samples, counts = asyncio.run(drive(port, admin_port, keys, sidecar.pid, args.minutes))
    finally:
        sidecar.terminate()
        upstream.terminate()
        sidecar.wait(30)
        upstream.wait(30)
    print("requests:", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    warm = [s for s in samples if 60 <= s[0] <= 120] or samples[: max(1, len(samples) // 4)]
    last = [s for s in samples if s[0] >= samples[-1][0] - 60]
    rss0, rss1 = statistics.median(s[1] for s in warm), statistics.median(s[1] for s in last)
    fd0, fd1 = statistics.median(s[2] for s in warm), statistics.median(s[2] for s in last)
    print(f"RSS after warm-up {rss0:.0f} KiB, last minute {rss1:.0f} KiB ({(rss1 - rss0) / rss0 * 100:+.1f}%); "
          f"fds {fd0:.0f} -> {fd1:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
