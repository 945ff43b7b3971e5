"""A real Redis for the tests; never a skip.

The machine's server on 127.0.0.1:6379 is used when it answers PING (``scripts/services`` starts
one there on a test machine). Otherwise a throw-away ``redis-server`` (Debian's package) is
started on a free loopback port, without persistence, for the test session.

Fixtures (registered for every test by ``tests/conftest.py``):

* ``redis_url`` (session): ``redis://127.0.0.1:PORT/0`` of the server in use.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

HOST = "127.0.0.1"
DEFAULT_PORT = 6379


def answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def throwaway_server() -> Iterator[int]:
    """A private ``redis-server`` on a free loopback port; its port."""
    program = shutil.which("redis-server")
    if program is None:
        raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed; "
                           "run scripts/services (as root it installs and starts one)")
    port = _free_port()
    process = subprocess.Popen([program, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not answers_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if answers_ping(DEFAULT_PORT):
        yield f"redis://{HOST}:{DEFAULT_PORT}/0"
        return
    with throwaway_server() as port:
        yield f"redis://{HOST}:{port}/0"
