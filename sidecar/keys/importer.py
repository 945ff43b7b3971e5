"""Importing a key value made elsewhere (``toolio-sidecar keys generate``), for bootstrapping from a
Secret (docs/reference/cli.md, keys import).

The store gets what ``keys create`` would have written, an argon2id hash looked up by the key's
lookup id, and the value itself is never stored, logged or printed. Importing is idempotent, so an
init container or a hook Job can run it on every start: the same value under the same name is a
no-op, while a different value under a name that is taken, or a value whose lookup id belongs to
another key, is refused (:class:`InvalidInput`) instead of being merged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.keys.audit import KEY_IMPORTED, AuditLog
from sidecar.keys.errors import InvalidInput
from sidecar.keys.format import KeyFormatError, KeyHasher, parse_key
from sidecar.keys.manager import new_key_id, validate_name, validate_rate_limit, validate_roles
from sidecar.keys.records import ENABLED, KeyRecord, utcnow
from sidecar.keys.store.base import DuplicateLookupId, DuplicateName, KeyStore
from sidecar.settings import Settings

# The variable ``keys import`` reads the value from (else standard input); a Kubernetes Secret
# reaches the container this way without the value appearing in any manifest.
IMPORT_KEY_ENV = "TOOLIO_SIDECAR_IMPORT_KEY"


@dataclass(frozen=True, slots=True)
class ImportResult:
    record: KeyRecord
    imported: bool          # False: the same key was already there (a no-op)
    roles_differ: bool      # already there, with other roles than asked (left as they are)
    rate_limit_differs: bool = False  # already there, with another own rate limit (left as it is)


def _bad_value(message: str) -> InvalidInput:
    return InvalidInput("invalid_key", message, "key")


async def import_key(settings: Settings, store: KeyStore, hasher: KeyHasher, audit: AuditLog, *,
                     value: str, name: object, roles: object, actor: str,
                     workspace: str | None = None, rate_limit: object = None) -> ImportResult:
    """Store ``value`` (a full ``tak_`` key) as the key ``name`` with ``roles`` (and its own
    ``rate_limit``, None: its roles') in ``workspace`` (default: the configured one; required
    with [workspaces]), or find it there."""
    home = workspace if workspace is not None else (None if settings.multi_workspace else settings.workspace)
    if home is None:
        # As `keys create`: with [workspaces] no workspace is the default one (docs/reference/cli.md).
        raise InvalidInput("missing_workspace", "workspace is required: keys belong to one workspace",
                           "workspace")
    valid_name = validate_name(name)
    valid_roles = validate_roles(roles, settings)
    own_limit = validate_rate_limit(rate_limit)
    try:
        parsed = parse_key(value)
    except KeyFormatError as exc:
        raise _bad_value(f"the value to import is not a valid key ({exc}); make one with "
                         "`toolio-sidecar keys generate`") from None
    for _ in range(2):  # a second pass only after losing an insert race (another pod importing too)
        existing = await _already_there(store, hasher, home, parsed.lookup_id, parsed.full, valid_name)
        if existing is not None:
            return ImportResult(existing, imported=False, roles_differ=existing.roles != valid_roles,
                                rate_limit_differs=existing.rate_limit != own_limit)
        key_hash = await asyncio.to_thread(hasher.hash, parsed.full)
        record = KeyRecord(
            id=new_key_id(), lookup_id=parsed.lookup_id, name=valid_name, roles=valid_roles,
            workspace=home, status=ENABLED, created_at=utcnow(), created_by=actor,
            key_hash=key_hash, rate_limit=own_limit)
        event = audit.event(KEY_IMPORTED, actor, key_id=record.id, key_name=record.name, client=None,
                            workspace=home, details={"roles": list(valid_roles), "rate_limit": own_limit})
        try:
            stored = await store.insert_key(record, [event])
        except (DuplicateName, DuplicateLookupId):
            continue
        audit.emitted(event)
        return ImportResult(stored, imported=True, roles_differ=False)
    raise _bad_value("the key changed in the store while it was being imported; run the import again")


async def _already_there(store: KeyStore, hasher: KeyHasher, workspace: str, lookup_id: str, value: str,
                         name: str) -> KeyRecord | None:
    """The stored record when exactly this key is already imported under ``name``; None when
    neither the name nor the lookup id is in use; :class:`InvalidInput` for any other overlap."""
    by_lookup = await store.get_by_lookup_id(lookup_id)
    if by_lookup is not None:
        same = (by_lookup.workspace == workspace and by_lookup.name == name
                and await asyncio.to_thread(hasher.verify, by_lookup.key_hash, value))
        if not same:
            # Says no more than that: not which key holds the lookup id, nor whether the secret matched.
            raise _bad_value("another key already uses this value's lookup id; generate a new value with "
                             "`toolio-sidecar keys generate`")
        return by_lookup
    taken = [r for r in await store.list_keys(workspace) if r.name == name]
    if taken:
        raise InvalidInput("name_taken", f"a key named {name!r} already exists with a different value; "
                                         "choose another --name, or rotate that key instead", "name")
    return None
