"""The authenticated caller: what the proxy forwards and signs about a key."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sidecar.gate.tools import ToolPolicy, policy_for
from sidecar.keys.records import KeyRecord
from sidecar.settings import Settings

# Control characters: these values become header fields upstream (RFC 9110 5.5 forbids CR, LF and
# NUL in field values); config and key validation already exclude them, this is the last line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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

    @classmethod
    def from_record(cls, record: KeyRecord, settings: Settings) -> Principal:
        roles = tuple(sorted(record.roles))
        perms = tuple(sorted(settings.permissions_for(roles)))
        if _CONTROL.search("".join((record.id, record.name, record.workspace, *roles, *perms))):
            raise ValueError(f"key {record.id}: a control character in a value sent upstream")
        claims_prefix = json.dumps(
            {"iss": settings.signing.issuer, "aud": settings.signing.audience, "sub": record.id,
             "name": record.name, "ws": record.workspace, "roles": list(roles), "perms": list(perms)},
            separators=(",", ":"),
        )[:-1]
        patterns = settings.tool_patterns_for(roles)
        return cls(
            tools=policy_for(patterns) if patterns is not None else None,
            key_id=record.id, lookup_id=record.lookup_id, name=record.name, workspace=record.workspace,
            roles=roles, permissions=perms, deadline=record.deadline(), revision=record.revision,
            roles_header=",".join(roles), permissions_header=",".join(perms), claims_prefix=claims_prefix,
        )
