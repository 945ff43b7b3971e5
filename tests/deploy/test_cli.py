"""The ``toolio-sidecar`` command line (docs/reference/config.md): key management straight in the store, exit
statuses, and start-up refusing bad config with a message naming the key."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.__main__ import main
from sidecar.keys.format import parse_key
from sidecar.settings import CONFIG_ENV
from tests.support.config import ROLES, ConfigFactory
from tests.support.harness import SidecarStarter, bearer, client_session
from tests.support.processes import run_cli
from tests.support.upstreams import RecordingUpstream

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


def test_a_keys_own_rate_limit_is_set_on_create_changed_by_update_and_shown(cli: Cli) -> None:
    created = cli.json("keys", "create", "--name", "paced", "--role", "viewer", "--rate-limit", "100/second")
    assert (created["rate_limit"], created["rate_limit_source"]) == ("100/second", "key")
    updated = cli.json("keys", "update", "paced", "--rate-limit", "unlimited")
    assert (updated["rate_limit"], updated["effective_rate_limit"]) == ("unlimited", "unlimited")
    code, shown, _ = cli("keys", "show", created["id"])
    assert code == 0 and "rate_limit: unlimited (own)" in shown
    back = cli.json("keys", "update", created["id"], "--rate-limit", "roles")
    assert (back["rate_limit"], back["rate_limit_source"], back["effective_rate_limit"]) == (None, "roles",
                                                                                             "unlimited")
    code, listed, _ = cli("keys", "list")
    assert code == 0
    assert "RATE LIMIT" in listed.splitlines()[0]
    assert "unlimited (roles)" in next(line for line in listed.splitlines() if "paced" in line)
    events = cli.json("audit", "list", "--action", "key.updated")["events"]
    assert [(e["actor"], e["details"]) for e in events] == [
        ("cli", {"rate_limit": {"from": "unlimited", "to": None}}),
        ("cli", {"rate_limit": {"from": "100/second", "to": "unlimited"}}),
    ]


@pytest.mark.parametrize("value", ["0/second", "10/day", "fast", "", "ROLES", "\u0661/second"])
def test_a_bad_rate_limit_exits_2_with_one_line_naming_it(cli: Cli, value: str) -> None:
    path = str(cli.path)
    assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--name", "n", "--role", "viewer",
                                      f"--rate-limit={value}"), "rate_limit")
    old = cli.json("keys", "create", "--name", "old", "--role", "viewer")
    code, _, err = run_main("keys", "update", old["id"], "--config", path, f"--rate-limit={value}", "--json")
    assert code == 2
    assert (json.loads(err)["error"], json.loads(err)["field"]) == ("invalid_rate_limit", "rate_limit")
    assert [(k["name"], k["rate_limit"]) for k in cli.json("keys", "list")["keys"]] == [("old", None)]


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
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
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


# -- malformed arguments: one line on stderr and status 2, never a traceback --------------------


def run_main(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process, argparse's own exits included; returns status, out, err."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_one_line_refusal(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# Valid RFC 3339 that leaves datetime's years 1-9999 once converted to UTC, past, or malformed.
BAD_TIMES = ["9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-00:01", "0001-01-01T00:00:00+01:00",
             "0001-01-01T00:00:00Z", "2001-01-01T00:00:00Z", "+10000-01-01T00:00:00Z",
             "\u0662\u0669\u0669\u0669-01-01T00:00:00Z", "2999-12-31T23:59:60Z", "2999-01-01T00:00:00+24:00",
             "2999-01-01T00:00:00", "", "NaN", "true"]


@pytest.mark.parametrize("value", BAD_TIMES)
def test_a_bad_expiry_exits_2_with_one_line_naming_it(cli: Cli, value: str) -> None:
    path = str(cli.path)
    assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--name", "n", "--role", "viewer",
                                      f"--expires-at={value}"), "expires_at")
    code, _, err = run_main("keys", "create", "--config", path, "--name", "n", "--role", "viewer",
                            f"--expires-at={value}", "--json")
    assert code == 2
    assert json.loads(err) == {"error": "invalid_time", "message": json.loads(err)["message"], "field": "expires_at"}
    old = cli.json("keys", "create", "--name", "old", "--role", "viewer")
    assert_one_line_refusal(*run_main("keys", "rotate", old["id"], "--config", path, "--name", "new",
                                      f"--disable-old-at={value}"), "disable_old_at")
    assert [k["name"] for k in cli.json("keys", "list")["keys"]] == ["old"]


def test_an_expiry_at_the_top_of_the_range_is_accepted(cli: Cli) -> None:
    created = cli.json("keys", "create", "--name", "n", "--role", "viewer", "--expires-at", "9999-12-31T23:59:59Z")
    assert created["expires_at"] == "9999-12-31T23:59:59.000Z"


@pytest.mark.parametrize("key_id", ["key_\udcff", "key x", "key\nx", "", "k" * 200, "../../etc/passwd",
                                    "key_\u0661\u0662", "key_\u202e"])
@pytest.mark.parametrize("verb", ["show", "disable", "enable", "rotate"])
def test_a_malformed_key_id_exits_2_with_one_line(cli: Cli, key_id: str, verb: str) -> None:
    extra = ("--name", "new") if verb == "rotate" else ()
    assert_one_line_refusal(*run_main("keys", verb, key_id, "--config", str(cli.path), *extra), "id")
    code, _, err = run_main("keys", verb, key_id, "--config", str(cli.path), *extra, "--json")
    assert code == 2
    assert (json.loads(err)["error"], json.loads(err)["field"]) == ("invalid_id", "id")


def test_odd_names_and_roles_exit_2_with_one_line(cli: Cli) -> None:
    path = str(cli.path)
    for name in ("a\nb", "\udcff", "\uff4e\uff41\uff4d\uff45", "x" * 65, ""):
        assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--name", name, "--role", "viewer"),
                                "name")
    for role in ("view\ner", "\udcff\udcfe", "viewer\r", "\u2028"):
        assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--name", "n", "--role", role),
                                "role")
    assert cli.json("keys", "list")["keys"] == []


def test_usage_errors_are_one_line(cli: Cli) -> None:
    path = str(cli.path)
    assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--role", "viewer"), "--name")
    assert_one_line_refusal(*run_main("keys", "show", "--config", path), "id")
    assert_one_line_refusal(*run_main("keys", "frobnicate"), "frobnicate")
    assert_one_line_refusal(*run_main("keys", "create", "--config", path, "--name", "a", "--role", "viewer",
                                      "--bogus\nflag"), "--bogus\\nflag")
    for port in ("99999", "-1", "\u0661\u0662", "80a", ""):
        assert_one_line_refusal(*run_main("demo", "--port", port, "--once"), "--port")


def test_config_that_is_a_directory_or_not_utf8_exits_2_with_one_line(config: ConfigFactory) -> None:
    assert_one_line_refusal(*run_main("keys", "list", "--config", str(config.tmp_path)), "config")
    binary = config.tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe workspace = 1")
    assert_one_line_refusal(*run_main("keys", "list", "--config", str(binary)), "UTF-8")
    assert_one_line_refusal(*run_main("keys", "list", "--config", str(config.tmp_path / "a\nb.toml")), "a\\nb")


def test_a_data_dir_the_store_cannot_use_exits_2_naming_it(config: ConfigFactory) -> None:
    blocker = config.tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = config.write({"data_dir": str(blocker)})
    assert_one_line_refusal(*run_main("keys", "list", "--config", str(path)), "data_dir")
    config.data_dir.mkdir()
    (config.data_dir / "sidecar.db").write_bytes(b"this is not SQLite" * 100)
    path = config.write(name="garbage.toml")
    assert_one_line_refusal(*run_main("keys", "create", "--config", str(path), "--name", "n", "--role", "viewer"),
                            "data_dir")


async def test_undecodable_argument_bytes_from_a_shell_exit_2_with_one_line(config: ConfigFactory) -> None:
    # Invalid UTF-8 in argv becomes lone surrogates (PEP 383), which SQLite cannot bind.
    path = str(config.write())
    for args in (("keys", "show", "key_\udcff\udcfe"), ("keys", "disable", "key_\udcc3"),
                 ("keys", "rotate", "key_\udcff", "--name", "n"),
                 ("keys", "create", "--name", "n\udcff", "--role", "viewer"),
                 ("keys", "create", "--name", "n", "--role", "\udcff"),
                 ("keys", "create", "--name", "n", "--role", "viewer", "--expires-at", "9999-12-31T23:59:59-23:59"),
                 ("keys", "create", "--name", "n", "--role", "viewer", "--expires-at", "2999\udcff")):
        result = await run_cli(*args, "--config", path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (args, result.stderr)


# Argument values as a shell hands them over: any text, or any bytes but NUL with undecodable
# ones as lone surrogates (PEP 383); plus the edge date-times.
argv_values = (st.text(max_size=30)
               | st.binary(max_size=30).filter(lambda b: b"\0" not in b).map(
                   lambda b: b.decode("utf-8", "surrogateescape"))
               | st.sampled_from([*BAD_TIMES, "9999-12-31T23:59:59Z", "2999-01-01T00:00:00.123456789+05:30"]))
CLI_FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@CLI_FUZZ
@given(command=st.sampled_from(["create-expiry", "create-name", "create-role", "create-rate", "show", "disable",
                                "enable", "rotate-id", "rotate-at", "update-rate", "demo-port"]),
       value=argv_values, as_json=st.booleans())
def test_any_argument_value_is_handled_or_refused_in_one_line(cli: Cli, command: str, value: str,
                                                              as_json: bool) -> None:
    unique = f"n{zlib.crc32(repr((command, value)).encode())}"
    argv = {
        "create-expiry": ["keys", "create", "--name", unique, "--role", "viewer", f"--expires-at={value}"],
        "create-name": ["keys", "create", f"--name={value}", "--role", "viewer"],
        "create-role": ["keys", "create", "--name", unique, f"--role={value}"],
        "create-rate": ["keys", "create", "--name", unique, "--role", "viewer", f"--rate-limit={value}"],
        "show": ["keys", "show", "--", value],
        "disable": ["keys", "disable", "--", value],
        "enable": ["keys", "enable", "--", value],
        "rotate-id": ["keys", "rotate", "--name", unique, "--", value],
        "rotate-at": ["keys", "rotate", "--name", unique, f"--disable-old-at={value}", "--", "key_unknown"],
        "update-rate": ["keys", "update", f"--rate-limit={value}", "--", "key_unknown"],
        "demo-port": ["demo", f"--port={value}", "--once", "--config", "/nonexistent/for-the-demo.toml"],
    }[command]
    if command != "demo-port":
        argv[2:2] = ["--config", str(cli.path), *(["--json"] if as_json else [])]
    code, out, err = run_main(*argv)
    assert code in (0, 1, 2), (argv, code, err)
    if code == 0:
        assert err == ""
        return
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, (argv, err)
    assert "Traceback" not in err
    if as_json and command != "demo-port" and err.startswith("{"):
        refusal = json.loads(err)
        assert isinstance(refusal["error"], str) and isinstance(refusal["message"], str)
