"""The authenticated caller: what the proxy forwards and signs about a key."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sidecar.settings import Settings
from sidecar.store import KeyRecord


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    lookup_id: str
    name: str
    workspace: str
    roles: tuple[str, ...]          # sorted
    permissions: tuple[str, ...]    # sorted union of the roles' permissions (SPEC 1)
    deadline: float | None          # epoch seconds: expiry or scheduled disable
    # Pre-rendered once per cache fill so that a cache hit does no formatting work.
    roles_header: str
    permissions_header: str
    claims_prefix: str              # the static part of the assertion's JSON claims

    @classmethod
    def from_record(cls, record: KeyRecord, settings: Settings) -> Principal:
        roles = tuple(sorted(record.roles))
        perms = tuple(sorted(settings.permissions_for(roles)))
        claims_prefix = json.dumps(
            {"iss": settings.signing.issuer, "aud": settings.signing.audience, "sub": record.id,
             "name": record.name, "ws": record.workspace, "roles": list(roles), "perms": list(perms)},
            separators=(",", ":"),
        )[:-1]
        return cls(
            key_id=record.id, lookup_id=record.lookup_id, name=record.name, workspace=record.workspace,
            roles=roles, permissions=perms, deadline=record.deadline(),
            roles_header=",".join(roles), permissions_header=",".join(perms), claims_prefix=claims_prefix,
        )
