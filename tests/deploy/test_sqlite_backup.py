"""Backing up and restoring the SQLite store as docs/sqlite-backup-restore.md tells operators to:
docs/examples/sqlite_backup.py against a real ``toolio-sidecar serve``."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from tests.support.config import REPOSITORY
from tests.support.harness import bearer, client_session
from tests.support.processes import CliResult, Deployment, run_cli, serving
from tests.support.upstreams import RecordingUpstream

SCRIPT = REPOSITORY / "docs" / "examples" / "sqlite_backup.py"


async def backup_tool(*args: str) -> CliResult:
    """The script as the page runs it in a container: ``python - VERB ... < sqlite_backup.py``."""
    return await run_cli("-", *args, program=sys.executable, stdin=SCRIPT.read_bytes())


async def status_with(deployment: Deployment, key: str) -> int:
    async with client_session() as http, http.post(deployment.proxy_url + "/mcp", data=b"{}",
                                                   headers=bearer(key)) as resp:
        return resp.status


async def test_a_backup_taken_while_serving_restores_the_keys_as_they_were(
        tmp_path: Path, echo: RecordingUpstream) -> None:
    deployment = Deployment(tmp_path, echo.url)
    kept = await deployment.create_key("kept", "viewer")
    backup = tmp_path / "backup.db"
    async with serving(deployment):
        assert await status_with(deployment, kept["key"]) == 200
        taken = await backup_tool("backup", str(deployment.database), str(backup))
        assert taken.returncode == 0, taken.stderr
        assert taken.json()["keys"] == 1
        # After the backup: a new key, and the kept key disabled.
        later = await deployment.create_key("later", "viewer")
        assert (await deployment.cli("keys", "disable", kept["id"])).returncode == 0
        assert await status_with(deployment, later["key"]) == 200
    # One self-contained file: nothing of it lives in a write-ahead log beside it.
    assert not backup.with_name("backup.db-wal").exists()
    with sqlite3.connect(backup) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    restored = await backup_tool("restore", str(backup), str(deployment.database))
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["keys"] == 1
    async with serving(deployment):
        assert await status_with(deployment, kept["key"]) == 200  # enabled again, as at the backup
        assert await status_with(deployment, later["key"]) == 401  # made after the backup: gone
    listed = await deployment.cli("keys", "list", "--json")
    assert [k["name"] for k in listed.json()["keys"]] == ["kept"]


async def test_restore_refuses_a_file_that_is_not_a_store_and_leaves_the_database_alone(
        tmp_path: Path, echo: RecordingUpstream) -> None:
    deployment = Deployment(tmp_path, echo.url)
    await deployment.create_key("kept", "viewer")
    before = deployment.database.read_bytes()
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not a database" * 100)
    refused = await backup_tool("restore", str(bogus), str(deployment.database))
    assert refused.returncode == 1
    assert "not a toolio-sidecar store" in refused.stderr
    missing = await backup_tool("restore", str(tmp_path / "nothing.db"), str(deployment.database))
    assert missing.returncode == 1
    assert deployment.database.read_bytes() == before


async def test_backup_never_overwrites_an_existing_file(tmp_path: Path, echo: RecordingUpstream) -> None:
    deployment = Deployment(tmp_path, echo.url)
    await deployment.create_key("kept", "viewer")
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"precious")
    refused = await backup_tool("backup", str(deployment.database), str(existing))
    assert refused.returncode == 1
    assert existing.read_bytes() == b"precious"
    assert (await backup_tool("check", str(deployment.database))).json()["keys"] == 1
    assert (await backup_tool("restore", str(existing))).returncode == 2  # usage
