"""The [oauth] table (docs/reference/config.md, [oauth]): every value checked at load, a bad one
named by its dotted key."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.settings import OAuthSettings, SettingsError, settings_from_mapping

VALIDATE = {"mode": "validate", "issuer": "https://login.example.com", "resource": "https://acme.toolio.com/mcp"}


def _error_key(oauth: dict[str, Any]) -> str:
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping({"oauth": oauth}, {})
    assert caught.value.key in str(caught.value)
    return caught.value.key


def test_oauth_is_off_by_default() -> None:
    assert settings_from_mapping({}, {}).oauth == OAuthSettings(mode="off", resource="", issuer="", jwks_uri="",
                                                                audience="", roles_claim="roles")


def test_validate_reads_every_key_and_the_audience_defaults_to_the_resource() -> None:
    oauth = settings_from_mapping({"oauth": VALIDATE}, {}).oauth
    assert (oauth.mode, oauth.issuer, oauth.resource) == ("validate", VALIDATE["issuer"], VALIDATE["resource"])
    assert oauth.required_audience == VALIDATE["resource"]
    custom = {**VALIDATE, "audience": "api://toolio", "jwks_uri": "https://login.example.com/keys",
              "roles_claim": "realm_access.roles"}
    oauth = settings_from_mapping({"oauth": custom}, {}).oauth
    assert (oauth.required_audience, oauth.jwks_uri, oauth.roles_claim) == (
        "api://toolio", "https://login.example.com/keys", "realm_access.roles")


@pytest.mark.parametrize("mode", ["off", "pass-through"])
def test_only_validate_needs_an_issuer_and_a_resource(mode: str) -> None:
    assert settings_from_mapping({"oauth": {"mode": mode}}, {}).oauth.mode == mode


def test_plain_http_is_accepted_on_loopback_only() -> None:
    local = {**VALIDATE, "issuer": "http://127.0.0.1:8999", "resource": "http://localhost:8080/mcp",
             "jwks_uri": "http://[::1]:8999/jwks"}
    assert settings_from_mapping({"oauth": local}, {}).oauth.issuer == "http://127.0.0.1:8999"


@pytest.mark.parametrize(("oauth", "key"), [
    ({"mode": "on"}, "oauth.mode"),
    ({"mode": True}, "oauth.mode"),
    ({"mode": "validate", "resource": VALIDATE["resource"]}, "oauth.issuer"),
    ({"mode": "validate", "issuer": VALIDATE["issuer"]}, "oauth.resource"),
    ({**VALIDATE, "issuer": "http://login.example.com"}, "oauth.issuer"),
    ({**VALIDATE, "issuer": "https://login.example.com?tenant=1"}, "oauth.issuer"),
    ({**VALIDATE, "issuer": "login.example.com"}, "oauth.issuer"),
    ({**VALIDATE, "resource": "https://acme.toolio.com/mcp#x"}, "oauth.resource"),
    ({**VALIDATE, "resource": 'https://acme.toolio.com/"mcp'}, "oauth.resource"),
    ({**VALIDATE, "resource": "https://user:pw@acme.toolio.com/mcp"}, "oauth.resource"),
    ({**VALIDATE, "resource": "https://acme.toolio.com:port/mcp"}, "oauth.resource"),
    ({**VALIDATE, "jwks_uri": "ftp://login.example.com/keys"}, "oauth.jwks_uri"),
    ({**VALIDATE, "roles_claim": ""}, "oauth.roles_claim"),
    ({**VALIDATE, "audience": ["a", "b"]}, "oauth.audience"),
    ({**VALIDATE, "scopes": ["mcp"]}, "oauth.scopes"),
])
def test_a_bad_oauth_value_is_named(oauth: dict[str, Any], key: str) -> None:
    assert _error_key(oauth) == key
