"""The attack tests' own parts: forged tokens that reach the store, a check that an error body
leaks nothing, and an attacker in its own process (so its client-side work is not billed to the
sidecar's event loop)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from collections.abc import Sequence

import aiohttp

from sidecar.keys.format import ALPHABET, LOOKUP_LEN, PREFIX, SECRET_LEN, checksum
from sidecar.proxy.headers import IDENTITY_HEADERS
from tests.support.harness import RunningSidecar
from tests.support.metrics import sample
from tests.support.raw import LOOPBACK

IDENTITY_NAMES_LOWER = tuple(name.lower() for name in IDENTITY_HEADERS)
FORWARDING_NAMES_LOWER = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def checksum_valid_token(lookup_id: str, secret: str | None = None) -> str:
    """A token with the right shape and checksum (so it reaches the store), usually wrong."""
    body_secret = secret if secret is not None else "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LEN))
    assert len(lookup_id) == LOOKUP_LEN
    assert len(body_secret) == SECRET_LEN
    return f"{PREFIX}{lookup_id}{body_secret}{checksum(lookup_id, body_secret)}"


def assert_no_secrets(body: bytes, *secrets_: str) -> None:
    """An error body never carries identity header names, identity values or a key."""
    text = body.decode("latin-1").lower()
    for name in IDENTITY_NAMES_LOWER:
        assert name not in text, f"{name} leaked in {body!r}"
    for value in secrets_:
        if value:
            assert value.lower() not in text, f"secret value leaked in {body!r}"
    assert re.search(r"tak_[0-9a-z]{46}", text) is None, f"a key leaked in {body!r}"


# ---------------------------------------------------------------------------------------------
# An attacker in its own process (so its client-side work is not billed to the sidecar's loop)

ATTACK_SCRIPT = r'''
import http.client, json, sys, threading, time
host, port, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokens = json.loads(sys.stdin.readline())
statuses, lock = [], threading.Lock()

def worker(mine):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for token in mine:
        conn.request("GET", "/mcp", headers={"Authorization": "Bearer " + token})
        response = conn.getresponse()
        response.read()
        with lock:
            statuses.append(response.status)
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)

threads = [threading.Thread(target=worker, args=(tokens[n::concurrency],)) for n in range(concurrency)]
print("started", flush=True)
started = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(60)
print(json.dumps({"statuses": statuses, "seconds": time.perf_counter() - started}), flush=True)
'''


class Attacker:
    """Sends each token once over ``concurrency`` keep-alive connections from another process;
    reports every status and the attack's wall time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls, port: int, tokens: Sequence[str], concurrency: int = 4) -> Attacker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ATTACK_SCRIPT, LOOPBACK, str(port), str(concurrency),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps(list(tokens)).encode() + b"\n")
        await process.stdin.drain()
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"started\n"
        return cls(process)

    async def result(self) -> tuple[list[int], float]:
        try:
            out, _ = await asyncio.wait_for(self._process.communicate(), 60)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
            raise
        report = json.loads(out)
        return list(report["statuses"]), float(report["seconds"])


# Two clients on their own addresses (any 127/8 address is local on Linux): a key's holder, and
# someone who knows its lookup id.
HOLDER = "127.0.0.1"
ATTACKER = "127.0.0.5"


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections leave from ``address``."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60))


def argon2_runs(sidecar: RunningSidecar) -> float:
    """argon2 verifications the sidecar has run so far."""
    return sample(sidecar.services.registry, "toolio_sidecar_argon2_verify_seconds_count")

