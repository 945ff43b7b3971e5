"""The ``toolio-sidecar`` command line (SPEC 8): key management straight in the store, exit
statuses, and start-up refusing bad config with a message naming the key."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from sidecar_support import ROLES, ConfigFactory, EchoUpstream, SidecarStarter, bearer, client_session, run_cli

from sidecar.__main__ import main
from sidecar.apikeys import parse_key
from sidecar.settings import CONFIG_ENV

KEY_IN_TEXT = re.compile(r"tak_[0-9A-Za-z]{46}")


class Cli:
    """``main(argv)`` in this process with ``--config`` appended; captured output."""

    def __init__(self, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.path = path
        self._capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        code = main([*args, "--config", str(self.path)])
        out, err = self._capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(config: ConfigFactory, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config.write(), capsys)


def test_create_prints_the_full_key_once_and_list_and_show_never_do(cli: Cli) -> None:
    created = cli.json("keys", "create", "--name", "ci-bot", "--role", "viewer", "--role", "writer")
    key = created["key"]
    assert parse_key(key).full == key
    assert created["name"] == "ci-bot"
    assert created["roles"] == ["viewer", "writer"]
    assert created["permissions"] == ["plans:read", "plans:write"]
    assert created["status"] == "enabled"
    assert created["created_by"] == "cli"
    assert created["preview"] == key[:8] + "..."
    listed = cli.json("keys", "list")
    assert [k["id"] for k in listed["keys"]] == [created["id"]]
    shown = cli.json("keys", "show", created["id"])
    assert shown["preview"] == created["preview"]
    for args in (("keys", "list"), ("keys", "list", "--json"), ("keys", "show", created["id"]),
                 ("keys", "show", created["id"], "--json")):
        code, out, err = cli(*args)
        assert code == 0
        assert not KEY_IN_TEXT.search(out + err), args
        assert "ci-bot" in out
    assert "key" not in listed["keys"][0]
    assert "key" not in shown


def test_create_in_text_mode_shows_the_key_with_a_warning(cli: Cli) -> None:
    code, out, _ = cli("keys", "create", "--name", "ops", "--role", "org-admin")
    assert code == 0
    keys = KEY_IN_TEXT.findall(out)
    assert len(keys) == 1
    assert "only time" in out
    code, out, _ = cli("keys", "list")
    assert "ops" in out
    assert keys[0] not in out


def test_disable_and_enable_change_status_and_keep_the_key(cli: Cli) -> None:
    created = cli.json("keys", "create", "--name", "svc", "--role", "viewer")
    disabled = cli.json("keys", "disable", created["id"])
    assert disabled["status"] == "disabled"
    assert disabled["disabled_at"] is not None
    assert cli.json("keys", "show", created["id"])["status"] == "disabled"
    enabled = cli.json("keys", "enable", created["id"])
    assert enabled["status"] == "enabled"
    assert enabled["disabled_at"] is None
    assert enabled["preview"] == created["preview"]
    assert [k["status"] for k in cli.json("keys", "list")["keys"]] == ["enabled"]


@pytest.mark.parametrize("verb", ["show", "disable", "enable"])
def test_unknown_id_exits_1(cli: Cli, verb: str) -> None:
    code, out, err = cli("keys", verb, "key_doesnotexist00")
    assert code == 1
    assert out == ""
    assert "key_doesnotexist00" in err
    code, _, err = cli("keys", verb, "key_doesnotexist00", "--json")
    assert code == 1
    assert json.loads(err)["error"] == "not_found"


def test_unknown_role_exits_2_naming_the_valid_roles(cli: Cli) -> None:
    code, out, err = cli("keys", "create", "--name", "x", "--role", "superuser")
    assert code == 2
    assert out == ""
    assert "superuser" in err
    for role in ROLES:
        assert role in err
    code, _, err = cli("keys", "create", "--name", "x", "--role", "superuser", "--json")
    assert code == 2
    assert json.loads(err)["valid_roles"] == sorted(ROLES)
    assert cli.json("keys", "list")["keys"] == []


def test_bad_name_exits_2_and_taken_name_exits_1(cli: Cli) -> None:
    code, _, err = cli("keys", "create", "--name", "has space", "--role", "viewer")
    assert code == 2
    assert "name" in err
    cli.json("keys", "create", "--name", "taken", "--role", "viewer")
    code, _, err = cli("keys", "create", "--name", "taken", "--role", "viewer")
    assert code == 1
    assert "taken" in err


def test_rotate_copies_roles_into_a_new_key(cli: Cli) -> None:
    old = cli.json("keys", "create", "--name", "v1", "--role", "writer")
    new = cli.json("keys", "rotate", old["id"], "--name", "v2")
    assert new["roles"] == ["writer"]
    assert new["key"] != old["key"]
    assert cli.json("keys", "show", old["id"])["status"] == "enabled"


def test_missing_command_words_are_usage_errors(cli: Cli) -> None:
    with pytest.raises(SystemExit) as caught:
        cli("keys", "create", "--role", "viewer")
    assert caught.value.code == 2


def test_config_path_defaults_to_the_environment_then_the_working_directory(
        config: ConfigFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    path = config.write(name="elsewhere.toml")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert main(["keys", "create", "--name", "from-env", "--role", "viewer", "--json"]) == 0
    monkeypatch.delenv(CONFIG_ENV)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    assert main(["keys", "list"]) == 2  # no ./config.toml here
    assert "config.toml" in capsys.readouterr().err
    (cwd / "config.toml").write_text(path.read_text())
    assert main(["keys", "list", "--json"]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)["keys"]] == ["from-env"]


# -- other processes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "document", "key"), [
    (("serve",), {"workspace": "acme", "unknown_setting": 1}, "unknown_setting"),
    (("serve",), {"proxy": {"max_body_bytes": "ten"}}, "proxy.max_body_bytes"),
    (("serve",), {"signing": {"algorithm": "RS256"}}, "signing.algorithm"),
    (("serve",), {"proxy": {"listen": "nowhere"}}, "proxy.listen"),
    (("keys", "list"), {"admin": {"listen": "127.0.0.1"}}, "admin.listen"),
])
async def test_bad_config_stops_the_cli_with_status_2_naming_the_key(
        config: ConfigFactory, document: dict[str, Any], key: str, command: tuple[str, ...]) -> None:
    path = config.write(raw={"data_dir": str(config.data_dir), **document})
    result = await run_cli(*command, "--config", str(path))
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not config.data_dir.exists()  # refused before touching anything


async def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = await run_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


async def test_key_from_the_console_script_works_against_a_running_sidecar(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: EchoUpstream) -> None:
    overrides = {"proxy": {"upstream": echo.url}}
    sidecar = await start_sidecar(config.settings(overrides))
    script = Path(sys.executable).with_name("toolio-sidecar")
    assert script.exists(), "the package's console script is installed next to the interpreter"
    result = await run_cli("keys", "create", "--config", str(config.write(overrides)), "--name", "bootstrap",
                           "--role", "org-admin", "--json", program=str(script))
    assert result.returncode == 0, result.stderr
    key = result.json()["key"]
    async with client_session() as http, http.get(sidecar.proxy_url + "/mcp", headers=bearer(key)) as resp:
        assert resp.status == 200
    seen = echo.requests[0]
    assert seen.one("X-Toolio-Key-Name") == "bootstrap"
    assert seen.one("X-Toolio-Permissions") == "org:settings"
