"""The authenticated caller: what the proxy forwards and signs about a key or a signed-in user.

Everything keyed by a caller (session bindings, open streams, per-caller limits, the tool
policy) reads :attr:`Principal.key_id` and :attr:`Principal.roles`, so a user is a Principal too:
its ``key_id`` is its subject, ``user:<sub>``, which no key id (``key_`` + base62) can equal.
``kind`` tells the three kinds of traffic apart (docs/reference/headers.md, Added headers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sidecar.gate.tools import ToolPolicy, policy_for
from sidecar.keys.records import KeyRecord
from sidecar.settings import RateLimit, Settings

# Control characters: these values become header fields upstream (RFC 9110 5.5 forbids CR, LF and
# NUL in field values); config and key validation already exclude them, this is the last line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

KEY = "key"
USER = "user"
# pass-through mode: a Bearer token for the upstream to check (docs/reference/config.md, [oauth]);
# nothing is known about its holder, so no identity is sent and nothing is keyed by it.
PASSTHROUGH = "passthrough"
KINDS = (KEY, USER, PASSTHROUGH)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    lookup_id: str
    name: str
    workspace: str
    roles: tuple[str, ...]          # sorted
    permissions: tuple[str, ...]    # sorted union of the roles' permissions (docs/reference/keys.md)
    deadline: float | None          # epoch seconds: expiry or scheduled disable
    revision: int                   # the store revision of the record it was made from
    tools: ToolPolicy | None        # the MCP tools it may see and call; None: every tool
    # Pre-rendered once per cache fill so that a cache hit does no formatting work.
    roles_header: str
    permissions_header: str
    claims_prefix: str              # the static part of the assertion's JSON claims
    subject: str                    # "key:<id>" or "user:<sub>" (X-Toolio-Subject); "" for pass-through
    kind: str                       # KEY, USER or PASSTHROUGH
    rate_limit: RateLimit | None = None  # requests it may make; None: unlimited

    @classmethod
    def from_record(cls, record: KeyRecord, settings: Settings) -> Principal:
        roles = tuple(sorted(record.roles))
        perms = tuple(sorted(settings.permissions_for(roles)))
        if _CONTROL.search("".join((record.id, record.name, record.workspace, *roles, *perms))):
            raise ValueError(f"key {record.id}: a control character in a value sent upstream")
        subject = f"key:{record.id}"
        return cls(
            tools=_tool_policy(settings, roles),
            key_id=record.id, lookup_id=record.lookup_id, name=record.name, workspace=record.workspace,
            roles=roles, permissions=perms, deadline=record.deadline(), revision=record.revision,
            roles_header=",".join(roles), permissions_header=",".join(perms),
            claims_prefix=_claims_prefix(settings, record.id, record.name, record.workspace, roles, perms, subject),
            subject=subject, kind=KEY, rate_limit=settings.key_rate_limit(record.rate_limit, roles),
        )

    @classmethod
    def for_user(cls, sub: str, name: str, roles: tuple[str, ...] | list[str], settings: Settings) -> Principal:
        """A user signed in through OAuth (``validate`` mode): ``roles`` are already filtered to
        configured ones. Raises ValueError when a value cannot be sent upstream as a header."""
        subject = f"user:{sub}"
        ordered = tuple(sorted(set(roles)))
        perms = tuple(sorted(settings.permissions_for(ordered)))
        if _CONTROL.search("".join((subject, name, *ordered))):
            raise ValueError("a control character in a value sent upstream")
        return cls(
            tools=_tool_policy(settings, ordered),
            key_id=subject, lookup_id="", name=name, workspace=settings.workspace, roles=ordered,
            permissions=perms, deadline=None, revision=0, roles_header=",".join(ordered),
            permissions_header=",".join(perms),
            claims_prefix=_claims_prefix(settings, subject, name, settings.workspace, ordered, perms, subject),
            subject=subject, kind=USER, rate_limit=settings.rate_limit_for(ordered),
        )

    @classmethod
    def passthrough(cls, settings: Settings) -> Principal:
        """Any request of ``pass-through`` mode that is not a key's: forwarded for the upstream to
        authenticate. Its session bindings all have this one owner, so no key's session is ever
        usable with such a token, nor the reverse."""
        return cls(
            tools=None,  # the upstream authorizes what it authenticates
            key_id=PASSTHROUGH, lookup_id="", name="", workspace=settings.workspace, roles=(), permissions=(),
            deadline=None, revision=0, roles_header="", permissions_header="", claims_prefix="",
            subject="", kind=PASSTHROUGH,
        )


def _tool_policy(settings: Settings, roles: tuple[str, ...]) -> ToolPolicy | None:
    patterns = settings.tool_patterns_for(roles)
    return policy_for(patterns) if patterns is not None else None


def _claims_prefix(settings: Settings, sub: str, name: str, workspace: str, roles: tuple[str, ...],
                   perms: tuple[str, ...], subject: str) -> str:
    """The assertion's claims that do not change per request, as JSON without the closing brace
    (docs/reference/headers.md, Signed assertion)."""
    return json.dumps(
        {"iss": settings.signing.issuer, "aud": settings.signing.audience, "sub": sub, "name": name,
         "ws": workspace, "roles": list(roles), "perms": list(perms), "subject": subject},
        separators=(",", ":"),
    )[:-1]
