"""What goes upstream and what comes back: credential and identity stripping, hop-by-hop fields
(RFC 9110 7.6.1), our identity headers, and the upstream request's head."""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.gate.principal import Principal

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward, plus the fields this
# proxy owns itself: Host (the upstream's own, docs/reference/headers.md), Expect (100-continue is answered here)
# and credentials (MCP authorization spec: servers MUST NOT pass tokens through).
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer",
    "proxy-authorization", "proxy-authenticate",
})


# Content-Length too: the proxy frames the upstream request itself (RFC 9112 6.3), from the body
# it actually relays.
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "authorization", "content-length"}


_FORWARDED = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                        "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"})


_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


IDENTITY_HEADERS = ("X-Toolio-Key-Id", "X-Toolio-Key-Name", "X-Toolio-Workspace", "X-Toolio-Roles",
                    "X-Toolio-Permissions", "X-Toolio-Subject", "X-Toolio-Assertion")


def connection_tokens(values: Iterable[str]) -> set[str]:
    """Field names listed in Connection headers (RFC 9110 7.6.1), lower-cased."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


_KEEP, _DROP, _FORWARDING = 0, 1, 2


# Header name -> what to do with it. Names repeat across requests, so the string checks run
# once per distinct name; bounded, and simply rebuilt if a client sprays random names.
_name_actions: dict[str, int] = {}


def _action(name: str) -> int:
    action = _name_actions.get(name)
    if action is None:
        lower = name.lower()
        # Names with "_" are dropped outright: some servers (CGI, WSGI, many frameworks) read
        # "X_Toolio_Key_Id" as "X-Toolio-Key-Id", which would let a client spoof identity.
        if "_" in lower or lower in _REQUEST_DROP or lower.startswith("x-toolio-"):
            action = _DROP
        elif lower in _FORWARDED:
            action = _FORWARDING
        else:
            action = _KEEP
        if len(_name_actions) >= 4096:
            _name_actions.clear()
        _name_actions[name] = action
    return action


def upstream_header_lines(incoming: Iterable[tuple[str, str]], *, principal: Principal, assertion: str,
                          peer: str, peer_trusted: bool, proto: str, host: str) -> list[tuple[str, str]]:
    """What goes upstream: the client's headers minus credentials, hop-by-hop fields, anything
    that could pose as our identity headers, and untrusted forwarding info; plus exactly one
    of each identity and X-Forwarded-* header."""
    kept = _client_fields(incoming, peer=peer, peer_trusted=peer_trusted, proto=proto, host=host)
    # None of these names can be in ``kept`` (dropped above), so appending keeps exactly one.
    kept += (
        ("X-Toolio-Key-Id", principal.key_id),
        ("X-Toolio-Key-Name", principal.name),
        ("X-Toolio-Workspace", principal.workspace),
        ("X-Toolio-Roles", principal.roles_header),
        ("X-Toolio-Permissions", principal.permissions_header),
        ("X-Toolio-Subject", principal.subject),
        ("X-Toolio-Assertion", assertion),
    )
    return kept


def passthrough_header_lines(incoming: Iterable[tuple[str, str]], *, peer: str, peer_trusted: bool, proto: str,
                             host: str) -> list[tuple[str, str]]:
    """What goes upstream in ``oauth.mode = "pass-through"`` for a request that is not a key's
    (docs/reference/config.md, [oauth]): the same filtering, but the client's one
    ``Authorization: Bearer`` field passes unchanged when its token is not shaped like a key (the
    upstream does its own OAuth), and no identity header is added. A key never passes."""
    items = incoming if isinstance(incoming, list | tuple) else list(incoming)
    return _client_fields(items, peer=peer, peer_trusted=peer_trusted, proto=proto, host=host,
                          authorization=forwardable_authorization(items))


def forwardable_authorization(items: Iterable[tuple[str, str]]) -> str | None:
    """The value of the request's single ``Authorization: Bearer <token>`` field when the token is
    not shaped like a key (``tak_``, any case); else None."""
    values = [value for name, value in items if name.lower() == "authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token or token[:4].lower() == "tak_":
        return None
    return values[0]


def _client_fields(incoming: Iterable[tuple[str, str]], *, peer: str, peer_trusted: bool, proto: str, host: str,
                   authorization: str | None = None) -> list[tuple[str, str]]:
    """The client's fields that may go upstream, then exactly one of each X-Forwarded-* field;
    ``authorization``: the one Authorization value that passes (pass-through mode only)."""
    items = incoming if isinstance(incoming, list | tuple) else list(incoming)
    named_in_connection: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            named_in_connection |= connection_tokens((value,))
    kept: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    forwarded_proto: str | None = None
    forwarded_host: str | None = None
    for name, value in items:
        action = _action(name)
        if named_in_connection and name.lower() in named_in_connection:
            continue
        if action == _DROP:
            if authorization is not None and value == authorization and name.lower() == "authorization":
                kept.append((name, value))
            continue
        if action == _FORWARDING:
            if peer_trusted:
                lower = name.lower()
                if lower == "x-forwarded-for":
                    forwarded_for.extend(h.strip() for h in value.split(",") if h.strip())
                elif lower == "x-forwarded-proto" and forwarded_proto is None:
                    forwarded_proto = value.strip()
                elif lower == "x-forwarded-host" and forwarded_host is None:
                    forwarded_host = value.strip()
                elif lower == "forwarded":
                    kept.append((name, value))
            continue
        kept.append((name, value))
    # X-Forwarded-For lists hops left to right; the peer we saw is always the last one.
    forwarded_for.append(peer)
    kept += (
        ("X-Forwarded-For", ", ".join(forwarded_for)),
        ("X-Forwarded-Proto", forwarded_proto or proto),
        ("X-Forwarded-Host", forwarded_host or host),
    )
    return kept


def request_head(method: str, target: str, authority: str, fields: list[tuple[str, str]], framing: str) -> bytes:
    """The upstream request's head (RFC 9112 3, 5): request line, Host, ``fields``, the framing
    field, blank line. Field names and values came through the server's parser (llhttp rejects
    CR, LF and NUL in them) or are the sidecar's own, so nothing here can split the head.
    utf-8 with surrogateescape reverses the listener's decoding: the client's bytes pass unchanged."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"]
    parts += [f"{name}: {value}\r\n" for name, value in fields]
    parts.append(framing)
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response fields minus hop-by-hop ones, which RFC 9110 7.6.1 scopes to one
    connection in responses too (including any the upstream names in its own Connection), and
    minus Content-Length, which the listener writes from the body it actually sends."""
    items = headers if isinstance(headers, list | tuple) else list(headers)
    named = connection_tokens(value for name, value in items if name.lower() == "connection")
    if named:
        return [(name, value) for name, value in items
                if (lower := name.lower()) not in _RESPONSE_DROP and lower not in named]
    return [(name, value) for name, value in items if name.lower() not in _RESPONSE_DROP]
