"""Config loading (docs/reference/config.md): every key validated at load; a bad one is a SettingsError naming it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from sidecar.settings import (
    SIGNING_KEYS_ENV,
    ListenAddress,
    SettingsError,
    load_settings,
    settings_from_mapping,
)
from tests.support.config import ConfigFactory, to_toml


def _error_key(data: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping(data, environ or {})
    assert caught.value.key in str(caught.value)
    return caught.value.key


def test_empty_config_gives_the_documented_defaults() -> None:
    settings = settings_from_mapping({}, {})
    assert settings.workspace == "acme"
    assert settings.proxy.listen == ListenAddress("0.0.0.0", 8080)
    assert settings.proxy.upstream == "http://127.0.0.1:8000"
    assert settings.proxy.trusted_proxies == ()
    assert settings.proxy.allowed_origins == frozenset()
    assert settings.proxy.max_body_bytes == 10_485_760
    assert settings.proxy.upstream_timeout_seconds == 30
    assert settings.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert settings.admin.required_permission == "org:settings"
    assert settings.signing.algorithm == "ES256"
    assert settings.signing.private_key_files == ()
    assert settings.signing.issuer == "toolio-sidecar"
    assert settings.signing.audience == "toolio-mcp"
    assert settings.signing.lifetime_seconds == 60
    assert settings.roles["viewer"].permissions == {"plans:read"}
    assert settings.roles["org-admin"].permissions == {"org:settings"}
    assert settings.audit.retention_days == 90


def test_full_config_is_read_into_typed_settings(config: ConfigFactory) -> None:
    settings = config.settings({
        "proxy": {"listen": "[::1]:8443", "upstream": "https://mcp.internal:8000/base/",
                  "trusted_proxies": ["10.0.0.0/8", "fd00::1/64"],
                  "allowed_origins": ["https://App.Example.com", "http://localhost:3000/"],
                  "max_body_bytes": 1024, "upstream_timeout_seconds": 2},
        "admin": {"listen": "127.0.0.1:9999", "required_permission": "keys:admin"},
        "signing": {"algorithm": "EdDSA", "issuer": "me", "audience": "them", "lifetime_seconds": 30},
    })
    assert settings.proxy.listen == ListenAddress("::1", 8443)
    assert str(settings.proxy.listen) == "[::1]:8443"
    assert settings.proxy.upstream == "https://mcp.internal:8000/base"  # path appended later
    assert settings.proxy.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),
                                              ipaddress.ip_network("fd00::/64"))
    assert settings.proxy.allowed_origins == {"https://app.example.com", "http://localhost:3000"}
    assert settings.proxy.max_body_bytes == 1024
    assert settings.proxy.upstream_timeout_seconds == 2.0
    assert settings.admin.required_permission == "keys:admin"
    assert settings.signing.algorithm == "EdDSA"
    assert settings.permissions_for(["viewer", "writer"]) == {"plans:read", "plans:write"}
    assert settings.permissions_for(["nope"]) == frozenset()


@pytest.mark.parametrize(("data", "key"), [
    ({"bogus": 1}, "bogus"),
    ({"proxy": {"bogus": 1}}, "proxy.bogus"),
    ({"admin": {"listen": "127.0.0.1:9091", "bogus": True}}, "admin.bogus"),
    ({"signing": {"algorithms": "ES256"}}, "signing.algorithms"),
    ({"auth": {"cache": 1}}, "auth.cache"),
    ({"argon2": {"memory": 1}}, "argon2.memory"),
    ({"audit": {"retention": 30}}, "audit.retention"),
    ({"roles": {"viewer": {"permissions": [], "color": "red"}}}, "roles.viewer.color"),
])
def test_unknown_key_is_named(data: dict[str, Any], key: str) -> None:
    assert _error_key(data) == key


@pytest.mark.parametrize(("data", "key"), [
    ({"workspace": 3}, "workspace"),
    ({"workspace": "has space"}, "workspace"),
    ({"data_dir": ["x"]}, "data_dir"),
    ({"proxy": "not a table"}, "proxy"),
    ({"proxy": {"max_body_bytes": "10MB"}}, "proxy.max_body_bytes"),
    ({"proxy": {"max_body_bytes": True}}, "proxy.max_body_bytes"),
    ({"proxy": {"max_body_bytes": 1.5}}, "proxy.max_body_bytes"),
    ({"proxy": {"max_body_bytes": -1}}, "proxy.max_body_bytes"),
    ({"proxy": {"upstream_timeout_seconds": 0}}, "proxy.upstream_timeout_seconds"),
    ({"proxy": {"upstream_timeout_seconds": "30"}}, "proxy.upstream_timeout_seconds"),
    ({"proxy": {"trusted_proxies": "10.0.0.0/8"}}, "proxy.trusted_proxies"),
    ({"proxy": {"trusted_proxies": ["10.0.0.0/8", "nope"]}}, "proxy.trusted_proxies[1]"),
    ({"proxy": {"trusted_proxies": [10]}}, "proxy.trusted_proxies[0]"),
    ({"proxy": {"allowed_origins": ["example.com"]}}, "proxy.allowed_origins[0]"),
    ({"proxy": {"allowed_origins": ["https://a.example/path"]}}, "proxy.allowed_origins[0]"),
    ({"proxy": {"upstream": "ftp://x"}}, "proxy.upstream"),
    ({"proxy": {"upstream": "http://x:1/?q=1"}}, "proxy.upstream"),
    ({"proxy": {"upstream": "http://user:pw@x:1"}}, "proxy.upstream"),
    ({"proxy": {"allow_upgrade": "yes"}}, "proxy.allow_upgrade"),
    ({"admin": {"required_permission": "has space"}}, "admin.required_permission"),
    ({"signing": {"lifetime_seconds": 0}}, "signing.lifetime_seconds"),
    ({"signing": {"issuer": ""}}, "signing.issuer"),
    ({"signing": {"audience": ""}}, "signing.audience"),
    ({"signing": {"private_key_files": ["does-not-exist.pem"]}}, "signing.private_key_files[0]"),
    ({"argon2": {"time_cost": 0}}, "argon2.time_cost"),
    ({"argon2": {"memory_cost_kib": 8, "parallelism": 2}}, "argon2.memory_cost_kib"),
    ({"auth": {"store_poll_seconds": 5}}, "auth.store_poll_seconds"),
    ({"auth": {"max_queued_verifications": 0}}, "auth.max_queued_verifications"),
    ({"auth": {"failures_per_minute_per_lookup_id_total": 0}}, "auth.failures_per_minute_per_lookup_id_total"),
    ({"log_level": "loud"}, "log_level"),
    ({"audit": {"retention_days": 0}}, "audit.retention_days"),
    ({"audit": {"retention_days": 36_501}}, "audit.retention_days"),
    ({"audit": {"retention_days": 30.5}}, "audit.retention_days"),
    ({"audit": {"retention_days": "90"}}, "audit.retention_days"),
    ({"roles": {"bad name": {"permissions": []}}}, "roles.bad name"),
    ({"roles": {"viewer": "plans:read"}}, "roles.viewer"),
    ({"roles": {"viewer": {"permissions": "plans:read"}}}, "roles.viewer.permissions"),
    ({"roles": {"viewer": {"permissions": ["ok", "not ok"]}}}, "roles.viewer.permissions[1]"),
])
def test_bad_value_is_named(data: dict[str, Any], key: str) -> None:
    assert _error_key(data) == key


@pytest.mark.parametrize(("data", "key"), [
    pytest.param({"workspace": "acme\n"}, "workspace", id="workspace"),
    pytest.param({"roles": {"viewer\n": {"permissions": ["plans:read"]}}}, "roles.viewer\n", id="role-name"),
    pytest.param({"roles": {"viewer": {"permissions": ["plans:read\n"]}}}, "roles.viewer.permissions[0]",
                 id="permission"),
    pytest.param({"admin": {"required_permission": "org:settings\n"}}, "admin.required_permission",
                 id="required-permission"),
])
def test_a_name_with_a_trailing_newline_is_refused(data: dict[str, Any], key: str) -> None:
    # In Python's re, "$" also matches before a final "\n": a ^...$ rule let "acme\n" through. These
    # names are sent upstream as header field values, where a line break is never allowed
    # (RFC 9110 5.5).
    assert _error_key(data) == key


@pytest.mark.parametrize("algorithm", ["RS256", "none", "es256", "HS512", ""])
def test_unsupported_signing_algorithm_is_refused(algorithm: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping({"signing": {"algorithm": algorithm}}, {})
    assert caught.value.key == "signing.algorithm"
    assert "ES256, EdDSA, HS256" in str(caught.value)


@pytest.mark.parametrize("listen", ["8080", "localhost", ":8080", "host:port", "127.0.0.1:70000", "", "1.2.3.4:-1"])
def test_bad_listen_address_is_refused(listen: str) -> None:
    assert _error_key({"proxy": {"listen": listen}}) == "proxy.listen"
    assert _error_key({"admin": {"listen": listen}}) == "admin.listen"


def test_admin_may_not_share_the_public_listener() -> None:
    data = {"proxy": {"listen": "0.0.0.0:8080"}, "admin": {"listen": "0.0.0.0:8080"}}
    assert _error_key(data) == "admin.listen"


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "HS256"])
def test_each_supported_algorithm_is_accepted(algorithm: str) -> None:
    assert settings_from_mapping({"signing": {"algorithm": algorithm}}, {}).signing.algorithm == algorithm


def test_relative_paths_are_resolved_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pem").write_text("placeholder")
    path = tmp_path / "config.toml"
    path.write_text(to_toml({"data_dir": "state", "signing": {"private_key_files": ["keys/signing.pem"]}}))
    settings = load_settings(path, {})
    assert settings.data_dir == tmp_path / "state"
    assert settings.database_path == tmp_path / "state" / "sidecar.db"
    assert settings.signing.private_key_files == (tmp_path / "keys" / "signing.pem",)


def test_signing_keys_may_come_from_the_environment() -> None:
    secret = "s" * 40
    settings = settings_from_mapping({"signing": {"algorithm": "HS256"}}, {SIGNING_KEYS_ENV: secret})
    assert settings.signing.env_keys == secret
    assert secret not in repr(settings.signing)
    assert settings_from_mapping({}, {SIGNING_KEYS_ENV: ""}).signing.env_keys is None


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "absent.toml", {})
    assert caught.value.key == "config"
    assert "absent.toml" in str(caught.value)


def test_invalid_toml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("workspace = \n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path, {})
    assert caught.value.key == "config"
    assert "TOML" in str(caught.value)


def test_config_written_by_the_test_factory_round_trips(config: ConfigFactory) -> None:
    path = config.write({"proxy": {"max_body_bytes": 77}})
    loaded = load_settings(path, {})
    assert loaded == config.settings({"proxy": {"max_body_bytes": 77}})
    assert set(loaded.roles) == {"viewer", "org-admin", "writer"}


def test_settings_are_frozen() -> None:
    settings = settings_from_mapping({}, {})
    with pytest.raises(AttributeError):
        settings.workspace = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("public", "admin"), [("0.0.0.0:8080", "127.0.0.1:8080"),
                                               ("10.1.2.3:9000", "0.0.0.0:9000"),
                                               ("[::]:8080", "127.0.0.1:8080")])
def test_admin_may_not_overlap_a_wildcard_public_listener(public: str, admin: str) -> None:
    assert _error_key({"proxy": {"listen": public}, "admin": {"listen": admin}}) == "admin.listen"


def test_listeners_on_different_addresses_or_ports_are_fine() -> None:
    settings_from_mapping({"proxy": {"listen": "10.0.0.1:8080"}, "admin": {"listen": "127.0.0.1:8080"}}, {})
    settings_from_mapping({"proxy": {"listen": "127.0.0.1:0"}, "admin": {"listen": "127.0.0.1:0"}}, {})
