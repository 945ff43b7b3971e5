"""A real PostgreSQL for the tests; never a skip.

The machine's server on 127.0.0.1:5432 is used when it answers (as user ``postgres``, else as
the current user, trust or peer-less password-free login, with the right to create databases).
Otherwise a throw-away cluster is made from the PostgreSQL server binaries
(``/usr/lib/postgresql/*/bin`` on Debian) in a temporary directory, on a free port, run as an
unprivileged user when the tests run as root (initdb refuses root), and removed afterwards.
``TOOLIO_TEST_PG_PORT`` changes the port probed first; point it at a closed port to force the
throw-away cluster.

Fixtures (registered for every test by ``tests/conftest.py``):

* ``pg_server`` (session): the admin URL of the server in use;
* ``pg_database`` (session): the URL of a database made for this test run, dropped at its end;
* ``pg_throwaway_cluster``: :func:`throwaway_cluster` itself, to test the fallback;
* ``pg_url`` (function): that database's URL with a new empty schema first on the
  ``search_path`` (``?options=-csearch_path%3D...``), dropped after the test: every test starts
  from an empty schema for the cost of one CREATE SCHEMA.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

HOST = "127.0.0.1"
DEFAULT_PORT = 5432


def with_database(url: str, database: str, **query: str) -> str:
    """``url`` pointing at ``database``, with ``query`` as its query string."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database, query=urlencode(query)))


async def _usable(url: str) -> bool:
    try:
        con = await asyncpg.connect(url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    try:
        return bool(await con.fetchval(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"))
    finally:
        await con.close()


def reachable_server(port: int) -> str | None:
    """Admin URL of a server on 127.0.0.1:``port`` that lets us create databases, if any."""
    users = ["postgres"]
    with contextlib.suppress(Exception):
        if getpass.getuser() not in users:
            users.append(getpass.getuser())
    with socket.socket() as sock:
        sock.settimeout(2)
        if sock.connect_ex((HOST, port)) != 0:
            return None
    for user in users:
        url = f"postgresql://{user}@{HOST}:{port}/postgres"
        if asyncio.run(_usable(url)):
            return url
    return None


def server_bindir() -> Path:
    """Directory holding initdb and pg_ctl: Debian's newest version, else whatever PATH has."""
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version, reverse=True)
    if found:
        return found[0].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    pytest.fail("No PostgreSQL answers on 127.0.0.1 and no initdb was found to start one: "
                "run scripts/services as root, or apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A new PostgreSQL cluster in a temporary directory; yields its admin URL, removes it on exit."""
    bindir = server_bindir()
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")  # Debian's package creates it
        except KeyError:
            owner = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="toolio-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data = base / "data"
    log = base / "server.log"

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], cwd=base, capture_output=True, text=True, timeout=120, check=check,
            user=owner.pw_uid if owner else None, group=owner.pw_gid if owner else None,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )

    started = False
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        for _attempt in range(3):  # the free port may be taken before the server binds it
            port = _free_port()
            options = f"-F -p {port} -k {base} -c listen_addresses={HOST}"
            result = run(bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start",
                         check=False)
            if result.returncode == 0:
                started = True
                break
        if not started:
            text = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"throw-away PostgreSQL did not start: {result.stderr}\n{text[-2000:]}")
        yield f"postgresql://postgres@{HOST}:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"throw-away PostgreSQL: {exc.cmd[0]} failed: {exc.stderr}")
    finally:
        if started:
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_throwaway_cluster() -> Callable[[], AbstractContextManager[str]]:
    """:func:`throwaway_cluster`, for a test of the fallback itself."""
    return throwaway_cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    port = int(os.environ.get("TOOLIO_TEST_PG_PORT", DEFAULT_PORT))
    url = reachable_server(port)
    if url is not None:
        yield url
        return
    with throwaway_cluster() as url:
        yield url


async def _admin(url: str, *statements: str) -> None:
    con = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


@pytest.fixture(scope="session")
def pg_database(pg_server: str) -> Iterator[str]:
    name = f"toolio_test_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(pg_server, name)
    finally:
        # FORCE: connections a failed test leaked must not keep the database alive.
        asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def fresh_schema(pg_database: str) -> Iterator[str]:
    """A new empty schema in the run's database, first on the returned URL's ``search_path``;
    dropped afterwards (for sync fixtures; ``pg_url`` is the async one)."""
    schema = f"t_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_database, f"CREATE SCHEMA {schema}"))
    try:
        yield with_database(pg_database, urlsplit(pg_database).path.lstrip("/"), options=f"-csearch_path={schema}")
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            asyncio.run(_admin(pg_database, "SET lock_timeout = '2s'", f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture
async def pg_url(pg_database: str) -> AsyncIterator[str]:
    schema = f"t_{secrets.token_hex(6)}"
    await _admin(pg_database, f"CREATE SCHEMA {schema}")
    try:
        yield with_database(pg_database, urlsplit(pg_database).path.lstrip("/"),
                            options=f"-csearch_path={schema}")
    finally:
        # A session a failed test left open may hold locks here; the database goes at the end anyway.
        with contextlib.suppress(asyncpg.PostgresError):
            await _admin(pg_database, "SET lock_timeout = '2s'", f"DROP SCHEMA {schema} CASCADE")
