"""Property: whatever headers a client sends, ``upstream_header_lines`` hands the upstream no
credentials, no hop-by-hop fields, nothing that could pose as our identity, and exactly one of
each identity and X-Forwarded-* header (docs/reference/headers.md; RFC 9110 7.6.1; MCP: no token passthrough).
In pass-through mode (``passthrough_header_lines``) the one non-key Bearer field passes and no
identity is added."""

from __future__ import annotations

import dataclasses
import string
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.gate.principal import Principal
from sidecar.keys.records import ENABLED, KeyRecord
from sidecar.proxy.headers import HOP_BY_HOP, IDENTITY_HEADERS, passthrough_header_lines, upstream_header_lines
from sidecar.settings import settings_from_mapping

SETTINGS = settings_from_mapping({"roles": {"viewer": {"permissions": ["plans:read"]},
                                            "writer": {"permissions": ["plans:write", "plans:read"]}}}, {})
RECORD = KeyRecord(id="key_0123456789abcdef", lookup_id="LOOKUP00", name="agent", roles=("writer", "viewer"),
                   workspace="acme", status=ENABLED, created_at=datetime.now(UTC), created_by="test", key_hash="h")
PRINCIPAL = Principal.from_record(RECORD, SETTINGS)
ASSERTION = "header.claims.signature"


def upstream_headers(incoming: list[tuple[str, str]], **kwargs: Any) -> CIMultiDict[str]:
    """The fields ``upstream_header_lines`` sends, in order, looked up by name like the upstream."""
    return CIMultiDict(upstream_header_lines(incoming, **kwargs))
EXPECTED_IDENTITY = {
    "x-toolio-key-id": "key_0123456789abcdef",
    "x-toolio-key-name": "agent",
    "x-toolio-workspace": "acme",
    "x-toolio-roles": "viewer,writer",
    "x-toolio-permissions": "plans:read,plans:write",
    "x-toolio-subject": "key:key_0123456789abcdef",
    "x-toolio-assertion": ASSERTION,
}
FORWARDED_OWNED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
              "x-forwarded-prefix", "x-real-ip")
SPECIAL = (*sorted(HOP_BY_HOP), "authorization", "host", "expect", *EXPECTED_IDENTITY,
           "x-toolio-something", *FORWARDING)
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VISIBLE = "".join(chr(c) for c in range(0x20, 0x7F))


def disguise(name: str, bits: int) -> str:
    """``name`` in a case pattern and with ``-`` written as ``_`` where ``bits`` say so."""
    chars = []
    for index, char in enumerate(name):
        flip = bits >> (index % 60) & 1
        if char == "-":
            chars.append("_" if bits >> (60 + index % 4) & 1 else "-")
        else:
            chars.append(char.upper() if flip else char)
    return "".join(chars)


header_names = st.one_of(
    st.builds(disguise, st.sampled_from(SPECIAL), st.integers(0, 2**64 - 1)),
    st.text(alphabet=TCHAR, min_size=1, max_size=16),
)
values = st.text(alphabet=VISIBLE, max_size=40)
connection_values = st.lists(header_names, max_size=4).map(", ".join)
headers = st.lists(
    st.one_of(st.tuples(header_names, values), st.tuples(st.just("Connection"), connection_values),
              st.tuples(st.sampled_from(["connection", "CONNECTION"]), connection_values)),
    max_size=24,
)
peers = st.sampled_from(["127.0.0.1", "10.1.2.3", "2001:db8::1"])


def _named_in_connection(items: list[tuple[str, str]]) -> set[str]:
    return {t.strip().lower() for n, v in items if n.lower() == "connection" for t in v.split(",") if t.strip()}


@settings(max_examples=200)
@given(headers, peers, st.booleans(), st.sampled_from(["http", "https"]), st.sampled_from(["a.example", "b:8"]))
def test_upstream_headers_carry_only_our_identity_and_no_hop_by_hop_fields(
        incoming: list[tuple[str, str]], peer: str, trusted: bool, proto: str, host: str) -> None:
    out = upstream_headers(incoming, principal=PRINCIPAL, assertion=ASSERTION, peer=peer, peer_trusted=trusted,
                           proto=proto, host=host)
    names = [name.lower() for name in out]
    named = _named_in_connection(incoming)
    owned = set(EXPECTED_IDENTITY) | set(FORWARDED_OWNED)

    assert not HOP_BY_HOP & set(names)
    assert "authorization" not in names
    assert "host" not in names
    assert not [n for n in names if "_" in n]
    # A field the client named in Connection was for the proxy only; the ones the proxy sets
    # itself are present, but with the proxy's value.
    assert not (named - owned) & set(names)
    for header in IDENTITY_HEADERS:
        assert out.getall(header) == [EXPECTED_IDENTITY[header.lower()]]
    assert [n for n in names if n.startswith("x-toolio-")] == list(EXPECTED_IDENTITY)
    for header in FORWARDED_OWNED:
        assert len(out.getall(header)) == 1, header
    forwarded_for = out["X-Forwarded-For"]
    assert forwarded_for.rsplit(", ", 1)[-1] == peer
    if not trusted:
        assert forwarded_for == peer
        assert out["X-Forwarded-Proto"] == proto
        assert out["X-Forwarded-Host"] == host
        assert not {"forwarded", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"} & set(names)


@settings(max_examples=150)
@given(headers, peers, st.booleans())
def test_ordinary_headers_pass_through_unchanged_and_in_order(
        incoming: list[tuple[str, str]], peer: str, trusted: bool) -> None:
    out = upstream_headers(incoming, principal=PRINCIPAL, assertion=ASSERTION, peer=peer, peer_trusted=trusted,
                           proto="http", host="h")
    named = _named_in_connection(incoming)
    special = set(SPECIAL) | {"connection"}

    def ordinary(name: str) -> bool:
        lower = name.lower()
        return ("_" not in lower and lower not in special and lower not in named
                and not lower.startswith("x-toolio-"))

    expected = [(n, v) for n, v in incoming if ordinary(n)]
    assert [(n, v) for n, v in out.items() if ordinary(n)] == expected


def test_connection_named_fields_and_disguised_identity_are_dropped_in_a_known_case() -> None:
    incoming = [("Connection", "X-Hop, x-forwarded-host"), ("X-Hop", "1"), ("X-Forwarded-Host", "evil"),
                ("X_Toolio_Key_Id", "spoof"), ("x-toolio-roles", "org-admin"), ("Authorization", "Bearer t"),
                ("Keep-Alive", "5"), ("X-Kept", "yes")]
    out = upstream_headers(incoming, principal=PRINCIPAL, assertion=ASSERTION, peer="10.0.0.1",
                           peer_trusted=True, proto="https", host="mcp.example")
    assert list(out.items()) == [
        ("X-Kept", "yes"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "mcp.example"),
        ("X-Toolio-Key-Id", "key_0123456789abcdef"),
        ("X-Toolio-Key-Name", "agent"),
        ("X-Toolio-Workspace", "acme"),
        ("X-Toolio-Roles", "viewer,writer"),
        ("X-Toolio-Permissions", "plans:read,plans:write"),
        ("X-Toolio-Subject", "key:key_0123456789abcdef"),
        ("X-Toolio-Assertion", ASSERTION),
    ]


bearer_values = st.one_of(
    st.builds(lambda scheme, token: f"{scheme} {token}", st.sampled_from(["Bearer", "bearer", "Basic"]),
              st.one_of(st.text(alphabet=string.ascii_letters + string.digits + "-._~+/", min_size=1, max_size=30),
                        st.builds(lambda case, body: case + body, st.sampled_from(["tak_", "TAK_", "Tak_"]),
                                  st.text(alphabet=string.ascii_letters + string.digits, max_size=46)))),
    values,
)
with_credentials = st.lists(st.one_of(st.tuples(header_names, values),
                                      st.tuples(st.sampled_from(["Authorization", "authorization"]), bearer_values)),
                            max_size=16)


@settings(max_examples=200)
@given(with_credentials, peers, st.booleans())
def test_pass_through_forwards_only_one_non_key_bearer_field_and_no_identity(
        incoming: list[tuple[str, str]], peer: str, trusted: bool) -> None:
    out = passthrough_header_lines(incoming, peer=peer, peer_trusted=trusted, proto="https", host="h")
    names = [name.lower() for name, _ in out]
    assert not [n for n in names if n.startswith("x-toolio-") or "_" in n]
    assert not HOP_BY_HOP & set(names)
    sent = [value for name, value in out if name.lower() == "authorization"]
    given_values = [value for name, value in incoming if name.lower() == "authorization"]
    named = _named_in_connection(incoming)
    scheme, _, token = given_values[0].partition(" ") if len(given_values) == 1 else ("", "", "")
    if (len(given_values) == 1 and scheme.lower() == "bearer" and token and not token.lower().startswith("tak_")
            and "authorization" not in named):
        assert sent == given_values
    else:
        assert sent == []
    assert not [v for v in sent if v.partition(" ")[2].lower().startswith("tak_")]   # a key never passes
    for header in FORWARDED_OWNED:
        assert len([n for n in names if n == header]) == 1, header


@pytest.mark.parametrize("change", [
    pytest.param({"name": "agent\n"}, id="name-trailing-newline"),
    pytest.param({"name": "agent\r\nX-Toolio-Roles: org-admin"}, id="name-with-a-field-line"),
    pytest.param({"name": "agent\x00"}, id="name-with-nul"),
    pytest.param({"name": "agent\x7f"}, id="name-with-del"),
    pytest.param({"workspace": "acme\n"}, id="workspace"),
    pytest.param({"roles": ("viewer\n",)}, id="role"),
    pytest.param({"id": "key_0123456789abcde\t"}, id="key-id"),
])
def test_a_record_with_a_control_character_in_a_value_sent_upstream_is_refused(change: dict[str, Any]) -> None:
    # These values become header field values upstream, where CR, LF and NUL are never allowed
    # (RFC 9110 5.5): whatever got into the store (an older version's looser name rule, a
    # hand-edited row), no principal is made from it.
    record = dataclasses.replace(RECORD, **change)
    with pytest.raises(ValueError, match="control character"):
        Principal.from_record(record, SETTINGS)
