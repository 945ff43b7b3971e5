"""A first admin key from a Secret (docs/reference/cli.md, keys generate / keys import): a value
made offline, imported idempotently, never printed; the chart's init container runs the same
command (tests/deploy/test_helm_ingress.py checks the manifests)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.__main__ import main
from sidecar.keys.format import parse_key, preview
from sidecar.keys.importer import IMPORT_KEY_ENV
from tests.support.config import ConfigFactory
from tests.support.harness import bearer, client_session
from tests.support.processes import Deployment, run_cli, serving
from tests.support.upstreams import RecordingUpstream

KEY_IN_TEXT = re.compile(r"tak_[0-9A-Za-z]{46}")


class Cli:
    """``main(argv)`` in this process, the key value on standard input or in the environment."""

    def __init__(self, path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self._capsys = capsys
        self._monkeypatch = monkeypatch

    def __call__(self, *args: str, stdin: str = "", env_value: str | None = None) -> tuple[int, str, str]:
        self._capsys.readouterr()
        with self._monkeypatch.context() as patch:
            patch.setattr(sys, "stdin", io.StringIO(stdin))
            if env_value is None:
                patch.delenv(IMPORT_KEY_ENV, raising=False)
            else:
                patch.setenv(IMPORT_KEY_ENV, env_value)
            code = main([*args, "--config", str(self.path)])
        out, err = self._capsys.readouterr()
        return code, out, err

    def generate(self) -> str:
        code, out, _ = self("keys", "generate")
        assert code == 0
        return out.strip()

    def import_(self, value: str, name: str = "bootstrap-admin", *roles: str,
                workspace: str | None = None) -> tuple[int, str, str]:
        role_args = [a for role in (roles or ("org-admin",)) for a in ("--role", role)]
        workspace_args = ["--workspace", workspace] if workspace is not None else []
        return self("keys", "import", "--name", name, *role_args, *workspace_args, "--json", stdin=value + "\n")

    def listed(self) -> list[dict[str, Any]]:
        code, out, err = self("keys", "list", "--json")
        assert code == 0, err
        listed: list[dict[str, Any]] = json.loads(out)["keys"]
        return listed


@pytest.fixture
def cli(config: ConfigFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(config.write(), capsys, monkeypatch)


def test_generate_prints_a_new_well_formed_key_each_time_and_stores_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config.toml here: generating needs neither config nor store
    values = set()
    for _ in range(3):
        assert main(["keys", "generate"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n") and out.count("\n") == 1
        values.add(parse_key(out.strip()).full)
    assert len(values) == 3
    assert main(["keys", "generate", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["preview"] == preview(parse_key(generated["key"]).lookup_id)
    assert list(tmp_path.iterdir()) == []


def test_import_from_stdin_creates_the_key_and_never_prints_the_value(cli: Cli) -> None:
    value = cli.generate()
    code, out, err = cli.import_(value, "bootstrap-admin", "org-admin", "viewer")
    assert code == 0, err
    assert not KEY_IN_TEXT.search(out + err)
    imported = json.loads(out)
    assert imported["imported"] is True
    assert imported["name"] == "bootstrap-admin"
    assert imported["roles"] == ["org-admin", "viewer"]
    assert imported["preview"] == value[:8] + "..."
    assert imported["created_by"] == "cli"
    assert [k["id"] for k in cli.listed()] == [imported["id"]]


def test_import_reads_the_environment_variable_before_stdin(cli: Cli) -> None:
    from_env, on_stdin = cli.generate(), cli.generate()
    code, out, err = cli("keys", "import", "--name", "ops", "--role", "org-admin", "--json",
                         stdin=on_stdin, env_value=from_env + "\n")
    assert code == 0, err
    assert json.loads(out)["preview"] == from_env[:8] + "..."


def test_importing_the_same_value_again_is_a_no_op(cli: Cli, config: ConfigFactory) -> None:
    value = cli.generate()
    first = json.loads(cli.import_(value)[1])
    code, out, err = cli.import_(value)
    assert code == 0, err
    again = json.loads(out)
    assert again["imported"] is False
    assert again["id"] == first["id"]
    assert len(cli.listed()) == 1
    code, out, _ = cli("keys", "import", "--name", "bootstrap-admin", "--role", "org-admin", stdin=value)
    assert code == 0
    assert "already there; nothing changed" in out
    # Asking for other roles changes nothing either, and says so.
    code, out, err = cli.import_(value, "bootstrap-admin", "viewer")
    assert code == 0
    assert json.loads(out)["roles"] == ["org-admin"]
    assert "keeps its roles (org-admin)" in err


def test_a_different_value_under_a_taken_name_is_refused_with_status_2(cli: Cli) -> None:
    kept = json.loads(cli.import_(cli.generate())[1])
    code, out, err = cli.import_(cli.generate())
    assert code == 2
    refusal = json.loads(err)
    assert refusal["error"] == "name_taken"
    assert refusal["field"] == "name"
    assert "different value" in refusal["message"]
    assert not KEY_IN_TEXT.search(out + err)
    assert [k["id"] for k in cli.listed()] == [kept["id"]]


def test_the_same_value_under_another_name_is_refused_with_status_2(cli: Cli) -> None:
    value = cli.generate()
    cli.import_(value, "first")
    code, out, err = cli.import_(value, "second")
    assert code == 2
    refusal = json.loads(err)
    assert (refusal["error"], refusal["field"]) == ("invalid_key", "key")
    assert "lookup id" in refusal["message"]
    assert not KEY_IN_TEXT.search(out + err)
    assert [k["name"] for k in cli.listed()] == ["first"]


@pytest.mark.parametrize(("value", "expected"), [
    ("", "no key value"),
    ("tak_short", "not a valid key"),
    ("not-a-key-at-all", "not a valid key"),
], ids=["empty", "short", "no-prefix"])
def test_a_missing_or_malformed_value_is_refused_with_status_2(cli: Cli, value: str, expected: str) -> None:
    code, out, err = cli("keys", "import", "--name", "ops", "--role", "org-admin", stdin=value)
    assert code == 2
    assert expected in err
    assert value not in out or not value
    assert cli.listed() == []


def test_a_value_with_a_wrong_checksum_is_refused_without_echoing_it(cli: Cli) -> None:
    value = cli.generate()
    broken = value[:-1] + ("A" if value[-1] != "A" else "B")
    code, out, err = cli("keys", "import", "--name", "ops", "--role", "org-admin", stdin=broken)
    assert code == 2
    assert "checksum" in err
    assert broken not in out + err


def test_an_unknown_role_is_refused_and_lists_the_valid_ones(cli: Cli) -> None:
    code, _, err = cli.import_(cli.generate(), "ops", "root")
    assert code == 2
    assert json.loads(err)["valid_roles"] == ["org-admin", "viewer", "writer"]


async def test_generate_import_serve_then_import_again_end_to_end(
        tmp_path: Path, echo: RecordingUpstream, both_stores: str) -> None:
    """What the chart's init container does on every pod start, against a real ``serve``."""
    deployment = Deployment(tmp_path, echo.url)
    value = (await run_cli("keys", "generate")).stdout.strip()
    env = {**os.environ, IMPORT_KEY_ENV: value}

    async def import_once() -> dict[str, Any]:
        result = await run_cli("keys", "import", "--config", str(deployment.config), "--name", "bootstrap-admin",
                               "--role", "org-admin", "--json", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert value not in result.stdout + result.stderr
        imported: dict[str, Any] = result.json()
        return imported

    # Two pods starting together import at once: one creates the key, the other finds it.
    first, second = await asyncio.gather(import_once(), import_once())
    assert first["id"] == second["id"]
    assert sorted([first["imported"], second["imported"]]) == [False, True]
    async with serving(deployment), client_session() as http:
        async with http.get(deployment.admin_url + "/admin/api/keys", headers=bearer(value)) as resp:
            assert resp.status == 200, await resp.text()
            assert [k["name"] for k in (await resp.json())["keys"]] == ["bootstrap-admin"]
        async with http.post(deployment.proxy_url + "/mcp", data=b"{}", headers=bearer(value)) as resp:
            assert resp.status == 200
        assert echo.requests[-1].all("X-Toolio-Key-Name") == ["bootstrap-admin"]
        # The next pod start, while this one serves: nothing changes, the key keeps working.
        again = await import_once()
        assert again["imported"] is False
        assert again["id"] == first["id"]
        async with http.get(deployment.admin_url + "/admin/api/audit", headers=bearer(value)) as resp:
            actions = [e["action"] for e in (await resp.json())["events"]]
        assert actions.count("key.imported") == 1
        async with http.post(deployment.proxy_url + "/mcp", data=b"{}", headers=bearer(value)) as resp:
            assert resp.status == 200


def test_import_takes_a_workspace_and_needs_one_with_many_workspaces(
        config: ConfigFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    document = config.mapping({"workspaces": {"from_host": "{workspace}.toolio.com"}})
    del document["workspace"]
    cli = Cli(config.write(raw=document), capsys, monkeypatch)
    value = cli.generate()
    code, out, err = cli.import_(value)
    assert (code, out) == (2, "")
    assert json.loads(err)["field"] == "workspace"
    assert value not in err
    code, _, err = cli.import_(value, "bootstrap-admin", workspace="Acme.Corp")
    assert code == 2
    assert json.loads(err)["field"] == "workspace"
    assert cli.listed() == []

    code, out, err = cli.import_(value, "bootstrap-admin", workspace="acme")
    assert code == 0, err
    imported = json.loads(out)
    assert (imported["imported"], imported["workspace"]) == (True, "acme")
    again = json.loads(cli.import_(value, "bootstrap-admin", workspace="acme")[1])
    assert (again["imported"], again["id"]) == (False, imported["id"])
    # The same value cannot become a key of another workspace too.
    code, _, err = cli.import_(value, "bootstrap-admin", workspace="globex")
    assert code == 2
    assert "lookup id" in json.loads(err)["message"]
    assert [(k["id"], k["workspace"]) for k in cli.listed()] == [(imported["id"], "acme")]
    code, out, _ = cli("keys", "list", "--workspace", "globex", "--json")
    assert (code, json.loads(out)["keys"]) == (0, [])


def test_import_into_another_workspace_than_the_configured_one_is_refused(cli: Cli) -> None:
    code, _, err = cli.import_(cli.generate(), "bootstrap-admin", workspace="globex")
    assert code == 2
    assert json.loads(err) == {"error": "invalid_workspace", "field": "workspace",
                               "message": "--workspace 'globex': this config serves only workspace 'acme'"}
    assert cli.listed() == []
