"""The store commands as an operator runs them, in processes of their own, on a real SQLite
file and a real PostgreSQL database: ``migrate``, ``store copy`` (moving up from one pod to
several replicas, docs/operations.md "Moving from SQLite") and ``signing rotate``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import asyncpg

from sidecar.keys.store.postgres import PostgresKeyStore
from sidecar.proxy.assertion import STORED_KEYS_PUBLISH_SECONDS, signing_keys, stored_key_set
from sidecar.settings import load_settings
from tests.support.config import ConfigFactory
from tests.support.processes import run_cli

pytest_plugins = ["tests.support.postgres"]


def _configs(tmp_path: Path, pg_url: str) -> tuple[Path, Path]:
    old = ConfigFactory(tmp_path / "old")
    new = ConfigFactory(tmp_path / "new")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    return old.write(), new.write({"store": {"url": pg_url}})


async def test_migrate_applies_the_schema_once_and_then_nothing(tmp_path: Path, pg_url: str) -> None:
    _, new = _configs(tmp_path, pg_url)
    first = await run_cli("migrate", "--config", str(new), "--json")
    assert first.returncode == 0, first.stderr
    assert first.json()["applied"] >= 1
    again = await run_cli("migrate", "--config", str(new), "--json")
    assert again.json() == {"applied": 0}
    text = await run_cli("migrate", "--config", str(new))
    assert "0 migration(s) applied" in text.stdout


async def test_store_copy_moves_keys_and_audit_and_is_idempotent(tmp_path: Path, pg_url: str) -> None:
    old, new = _configs(tmp_path, pg_url)
    made = []
    for name in ("ops", "agent", "retired"):
        created = await run_cli("keys", "create", "--config", str(old), "--name", name,
                                "--role", "org-admin" if name == "ops" else "viewer", "--json")
        assert created.returncode == 0, created.stderr
        made.append(created.json())
    assert (await run_cli("keys", "disable", "--config", str(old), made[2]["id"])).returncode == 0
    copied = await run_cli("store", "copy", "--from-config", str(old), "--to-config", str(new), "--json")
    assert copied.returncode == 0, copied.stderr
    report = copied.json()
    assert report["keys_copied"] == 3
    assert report["events_copied"] == 4  # three key.created, one key.disabled
    # The same keys, statuses and audit on the new store; the old full keys still verify there.
    listed = await run_cli("keys", "list", "--config", str(new), "--json")
    by_id = {k["id"]: k for k in listed.json()["keys"]}
    assert set(by_id) == {k["id"] for k in made}
    assert by_id[made[2]["id"]]["status"] == "disabled"
    settings = load_settings(new, {})
    store = PostgresKeyStore(settings.store.url)
    await store.open()
    try:
        from argon2 import PasswordHasher

        record = await store.get_key(made[1]["id"])
        assert record is not None
        assert PasswordHasher().verify(record.key_hash, made[1]["key"])
        actions = [e.action for e in await store.list_audit("acme", 10, None)]
        assert sorted(actions) == ["key.created", "key.created", "key.created", "key.disabled"]
    finally:
        await store.close()
    # Again: nothing new, everything already there.
    again = await run_cli("store", "copy", "--from-config", str(old), "--to-config", str(new), "--json")
    assert again.json() == {"keys_copied": 0, "keys_already_there": 3, "events_copied": 0,
                            "events_already_there": 4}
    # A change in the old store after the first copy comes over on the next run.
    await run_cli("keys", "create", "--config", str(old), "--name", "late", "--role", "viewer")
    third = await run_cli("store", "copy", "--from-config", str(old), "--to-config", str(new), "--json")
    assert third.json()["keys_copied"] == 1


async def test_store_copy_refuses_to_overwrite_different_data(tmp_path: Path, pg_url: str) -> None:
    old, new = _configs(tmp_path, pg_url)
    created = await run_cli("keys", "create", "--config", str(old), "--name", "agent", "--role", "viewer", "--json")
    assert (await run_cli("store", "copy", "--from-config", str(old), "--to-config", str(new))).returncode == 0
    # The target's copy is changed behind the source's back; a name collision is made too.
    assert (await run_cli("keys", "disable", "--config", str(new), created.json()["id"])).returncode == 0
    await run_cli("keys", "create", "--config", str(old), "--name", "twin", "--role", "viewer")
    await run_cli("keys", "create", "--config", str(new), "--name", "twin", "--role", "viewer")
    refused = await run_cli("store", "copy", "--from-config", str(old), "--to-config", str(new))
    assert refused.returncode == 1
    assert "nothing was copied" in refused.stderr
    assert "differs" in refused.stderr and "twin" in refused.stderr
    assert "Traceback" not in refused.stderr
    con = await asyncpg.connect(pg_url)
    try:
        assert await con.fetchval("SELECT count(*) FROM keys") == 2  # nothing written
    finally:
        await con.close()


async def test_a_store_url_password_never_reaches_the_output(tmp_path: Path) -> None:
    config = ConfigFactory(tmp_path).write({"store": {"url": "postgresql://toolio:s3cret-pw@127.0.0.1:9/none"}})
    for args in (("migrate", "--config", str(config)), ("keys", "list", "--config", str(config))):
        result = await run_cli(*args)
        assert result.returncode in (1, 2)
        assert "s3cret-pw" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


async def test_signing_rotate_publishes_a_new_key_before_any_replica_signs_with_it(
        tmp_path: Path, pg_url: str) -> None:
    _, new = _configs(tmp_path, pg_url)
    settings = load_settings(new, {})
    store = PostgresKeyStore(settings.store.url)
    await store.open()
    try:
        before = await signing_keys(settings.signing, settings.data_dir, store)
        rotated = await run_cli("signing", "rotate", "--config", str(new), "--json")
        assert rotated.returncode == 0, rotated.stderr
        new_kid = rotated.json()["new_kid"]
        now = await signing_keys(settings.signing, settings.data_dir, store)
        # Published at once, but the old key still signs...
        assert [k.kid for k in now] == [before[0].kid, new_kid]
        # ...until its time has come; then the new one signs and the old one is still published.
        document = await store.get_or_create_secret("signing_keys:ES256", lambda: "")
        later = stored_key_set(document, "ES256", time.time() + STORED_KEYS_PUBLISH_SECONDS + 1)
        assert [k.kid for k in later] == [new_kid, before[0].kid]
        assert len(json.loads(document)["keys"]) == 2
    finally:
        await store.close()


async def test_signing_rotate_refuses_configured_or_per_pod_keys(tmp_path: Path) -> None:
    config = ConfigFactory(tmp_path).write()
    result = await run_cli("signing", "rotate", "--config", str(config))
    assert result.returncode == 2
    assert "Rotating signing keys" in result.stderr
