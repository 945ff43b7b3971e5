"""The command line at real scale and by common CLI conventions (docs/reference/cli.md), run as
real processes: ``--version``, keys named by id or name, ``keys list`` paging through thousands
of keys with filters, ``audit list``, a quiet stop when stdout's reader goes away (``| head``),
and a missing config file that says how to make one."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest

from sidecar.keys.records import DISABLED
from sidecar.keys.store.sqlite import SQLiteKeyStore
from tests.support.config import ConfigFactory
from tests.support.processes import run_cli
from tests.support.records import key_record

PAST = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


async def put_keys(config: ConfigFactory, count: int) -> None:
    """``count`` keys straight into the config's SQLite store (fixed hash: no argon2 per key)."""
    store = SQLiteKeyStore(config.database)
    await store.open()
    try:
        await store.import_records(
            [replace(key_record(n, name=f"bulk-{n:05d}"), lookup_id=f"C{n:07d}", created_at=PAST + timedelta(seconds=n),
                     status=DISABLED if n % 5 == 0 else "enabled",
                     roles=("viewer", "writer") if n % 2 == 0 else ("viewer",))
             for n in range(1, count + 1)], [])
    finally:
        await store.close()


async def test_version_comes_from_the_package_metadata() -> None:
    result = await run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"toolio-sidecar {version('toolio-sidecar')}\n"
    assert result.stderr == ""


async def test_keys_are_named_by_id_or_by_name(config: ConfigFactory) -> None:
    path = str(config.write())
    created = (await run_cli("keys", "create", "--config", path, "--name", "deploy-bot", "--role", "viewer",
                             "--json")).json()
    by_name = await run_cli("keys", "show", "deploy-bot", "--config", path, "--json")
    by_id = await run_cli("keys", "show", created["id"], "--config", path, "--json")
    assert by_name.returncode == by_id.returncode == 0
    assert by_name.json() == by_id.json()
    assert by_name.json()["id"] == created["id"]
    disabled = await run_cli("keys", "disable", "deploy-bot", "--config", path, "--json")
    assert disabled.json()["status"] == "disabled"
    rotated = await run_cli("keys", "rotate", "deploy-bot", "--config", path, "--name", "deploy-bot-2", "--json")
    assert rotated.json()["roles"] == ["viewer"]
    missing = await run_cli("keys", "show", "nobody", "--config", path)
    assert missing.returncode == 1
    assert missing.stderr == "error: no key with id or name 'nobody'\n"


async def test_keys_list_pages_through_thousands_with_filters(config: ConfigFactory) -> None:
    path = str(config.write())
    await put_keys(config, 2_345)
    listed = await run_cli("keys", "list", "--config", path, "--json")
    assert listed.returncode == 0, listed.stderr
    names = [k["name"] for k in listed.json()["keys"]]
    assert names == [f"bulk-{n:05d}" for n in range(1, 2_346)]  # past the 1,000-key page, in order
    text = await run_cli("keys", "list", "--config", path)
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "KEY", "STATUS", "ROLES", "RATE", "LIMIT", "LAST", "USED"]
    assert len(lines) == 2_346

    filtered = await run_cli("keys", "list", "--config", path, "--status", "disabled", "--role", "writer", "--json")
    assert [k["name"] for k in filtered.json()["keys"]] == [f"bulk-{n:05d}" for n in range(10, 2_346, 10)]
    found = await run_cli("keys", "list", "--config", path, "--search", "BULK-0012", "--sort=-name", "--json")
    assert [k["name"] for k in found.json()["keys"]] == [f"bulk-{n:05d}" for n in range(129, 119, -1)]

    for args, field in ((("--status", "on"), "status"), (("--role", "root"), "role"), (("--sort", "id"), "sort")):
        refused = await run_cli("keys", "list", "--config", path, *args, "--json")
        assert refused.returncode == 2
        assert json.loads(refused.stderr)["field"] == field
        plain = await run_cli("keys", "list", "--config", path, *args)
        assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: ")


async def test_output_into_a_closed_pipe_stops_quietly(config: ConfigFactory) -> None:
    path = str(config.write())
    await put_keys(config, 2_000)  # far more output than a pipe buffers
    for args in (("keys", "list"), ("keys", "list", "--json"), ("audit", "list", "--limit", "5")):
        # A real shell pipeline: head exits after one line while the CLI still writes.
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", 'set -o pipefail; "$@" | head -n 1', "pipeline", sys.executable, "-m", "sidecar", *args,
            "--config", path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(shell.communicate(), 60)
        assert out.count(b"\n") == 1, (args, out)
        assert err == b"", (args, err.decode())
        # 141: what a shell reports for a command SIGPIPE ended (the audit list fits the pipe).
        assert shell.returncode == (0 if args[0] == "audit" else 141), args


async def test_a_missing_config_says_once_how_to_create_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for args in (("keys", "list"), ("serve",), ("audit", "list")):
        result = await run_cli(*args, cwd=tmp_path, env=env)
        assert result.returncode == 2
        assert result.stderr == ("toolio-sidecar: no config file at config.toml; create one with: "
                                 "cp config.example.toml config.toml (or pass --config PATH, or set "
                                 "TOOLIO_SIDECAR_CONFIG)\n"), args
    elsewhere = await run_cli("keys", "list", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path, env=env)
    assert elsewhere.stderr.startswith(f"toolio-sidecar: no config file at {tmp_path / 'nope.toml'};")
    # Other problems with the file itself are named once too.
    broken = tmp_path / "broken.toml"
    broken.write_text("workspace = [")
    result = await run_cli("keys", "list", "--config", str(broken), cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("toolio-sidecar: config file: not valid TOML")
    assert "config: config:" not in result.stderr


async def test_audit_list_filters_by_key_and_action(config: ConfigFactory) -> None:
    path = str(config.write())
    for name in ("alpha", "beta"):
        assert (await run_cli("keys", "create", "--config", path, "--name", name, "--role", "viewer")).returncode == 0
    await run_cli("keys", "disable", "alpha", "--config", path)
    await run_cli("keys", "enable", "alpha", "--config", path)
    await run_cli("keys", "disable", "beta", "--config", path)

    everything = (await run_cli("audit", "list", "--config", path, "--json")).json()
    assert [(e["action"], e["key_name"]) for e in everything["events"]] == [
        ("key.disabled", "beta"), ("key.enabled", "alpha"), ("key.disabled", "alpha"),
        ("key.created", "beta"), ("key.created", "alpha")]
    assert everything["next_before"] is None
    assert {e["actor"] for e in everything["events"]} == {"cli"}

    alpha = (await run_cli("audit", "list", "--config", path, "--key", "alpha", "--json")).json()
    assert [e["action"] for e in alpha["events"]] == ["key.enabled", "key.disabled", "key.created"]
    beta_id = everything["events"][0]["key_id"]
    by_id = (await run_cli("audit", "list", "--config", path, "--key", beta_id, "--json")).json()
    assert [e["action"] for e in by_id["events"]] == ["key.disabled", "key.created"]
    disables = (await run_cli("audit", "list", "--config", path, "--action", "key.disabled", "--json")).json()
    assert [e["key_name"] for e in disables["events"]] == ["beta", "alpha"]

    # Paging by hand: --limit, then --before the id it names.
    first = (await run_cli("audit", "list", "--config", path, "--limit", "2", "--json")).json()
    assert len(first["events"]) == 2
    rest = (await run_cli("audit", "list", "--config", path, "--before", str(first["next_before"]),
                          "--json")).json()
    assert [e["id"] for e in first["events"] + rest["events"]] == [e["id"] for e in everything["events"]]

    text = await run_cli("audit", "list", "--config", path, "--action", "key.created")
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "TIME", "ACTION", "ACTOR"]
    assert [line.split()[2:5] for line in lines[1:]] == [["key.created", "cli", "beta"],
                                                          ["key.created", "cli", "alpha"]]

    unknown = await run_cli("audit", "list", "--config", path, "--key", "gamma", "--json")
    assert unknown.returncode == 1
    assert json.loads(unknown.stderr)["error"] == "not_found"
    for args in (("--action", "Key Disabled"), ("--key", "a b"), ("--limit", "0"), ("--limit", "\u0661")):
        refused = await run_cli("audit", "list", "--config", path, *args)
        assert refused.returncode == 2, args
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, args


@pytest.mark.parametrize("command", ["keys", "audit"])
async def test_help_names_the_new_options(command: str) -> None:
    words = ("list", "--help")
    result = await run_cli(command, *words)
    assert result.returncode == 0
    expected = ["--status", "--role", "--search", "--sort"] if command == "keys" else ["--key", "--action", "--limit"]
    for option in expected:
        assert option in result.stdout


COMPLETE = """source <("$@" completion bash)
complete_line() {
    read -ra COMP_WORDS <<< "$1"
    [[ "$1" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _toolio_sidecar
    echo "${COMPREPLY[*]}"
}
"""


@pytest.mark.parametrize(("line", "offered"), [
    ("toolio-sidecar ", "serve demo keys audit completion migrate store signing -h --help --version"),
    ("toolio-sidecar ke", "keys"),
    ("toolio-sidecar keys ", "create list show disable enable rotate update generate import -h --help"),
    ("toolio-sidecar keys list --s", "--search --status --sort"),
    ("toolio-sidecar keys list --status ", "enabled disabled"),
    ("toolio-sidecar keys list --sort -", "-name -created -last_used"),
    ("toolio-sidecar audit list --", "--help --config --key --action --limit --before --workspace --json"),
    ("toolio-sidecar completion ", "bash zsh -h --help"),
    ("toolio-sidecar keys list --config conf", "config.toml"),
])
async def test_bash_completion_offers_the_commands_and_options(tmp_path: Path, line: str, offered: str) -> None:
    (tmp_path / "config.toml").write_text("")
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", COMPLETE + f"complete_line {shlex.quote(line)}", "completion", sys.executable, "-m", "sidecar",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    out, err = await asyncio.wait_for(shell.communicate(), 30)
    assert (shell.returncode, err.decode()) == (0, "")
    assert out.decode().split() == offered.split()
