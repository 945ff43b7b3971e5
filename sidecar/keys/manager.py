"""Key management shared by the admin API and the CLI: validate -> store (+ audit, one
transaction) -> tell the running proxy (cache invalidation and stream cut).

Validation errors are :class:`InvalidInput` naming the offending field, so the API and the CLI
report the same words.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sidecar.keys.audit import KEY_CREATED, KEY_DISABLED, KEY_ENABLED, KEY_ROTATED, KEY_UPDATED, AuditLog
from sidecar.keys.errors import InvalidInput, KeyNotFound, NameTaken
from sidecar.keys.format import ALPHABET, KeyHasher, generate_key, preview
from sidecar.keys.listing import MAX_LIMIT, KeyPage, KeyQuery
from sidecar.keys.records import DISABLED, ENABLED, AuditRecord, KeyRecord, to_rfc3339, utcnow
from sidecar.keys.store.base import DuplicateLookupId, DuplicateName, KeyStore, StoreError
from sidecar.settings import UNLIMITED, Settings, parse_rate_limit

NAME_RULE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ChangeHook = Callable[[KeyRecord], None]


def new_key_id() -> str:
    return "key_" + "".join(secrets.choice(ALPHABET) for _ in range(16))


def key_json(record: KeyRecord, settings: Settings) -> dict[str, Any]:
    """The public key object (docs/reference/admin-api.md); never the hash, never the key."""
    return {
        "id": record.id,
        "name": record.name,
        "preview": preview(record.lookup_id),
        "roles": sorted(record.roles),
        "permissions": sorted(settings.permissions_for(record.roles)),
        "workspace": record.workspace,
        "status": record.status,
        "created_at": to_rfc3339(record.created_at),
        "created_by": record.created_by,
        "last_used_at": to_rfc3339(record.last_used_at),
        "disabled_at": to_rfc3339(record.disabled_at),
        "expires_at": to_rfc3339(record.expires_at),
        # When a disable scheduled by a rotation takes effect (docs/reference/keys.md, Rotation).
        "disable_at": to_rfc3339(record.disable_at),
        # The key's own limit (null: its roles'), and what applies (docs/reference/limits.md).
        "rate_limit": record.rate_limit,
        "effective_rate_limit": effective_rate_limit(record, settings),
        "rate_limit_source": "roles" if record.rate_limit is None else "key",
    }


def effective_rate_limit(record: KeyRecord, settings: Settings) -> str:
    """The limit the key's requests are held to: its own, else the most generous of its roles'
    (docs/reference/limits.md); "unlimited" when there is none."""
    limit = settings.key_rate_limit(record.rate_limit, record.roles)
    return UNLIMITED if limit is None else str(limit)


def validate_rate_limit(value: object, field: str = "rate_limit") -> str | None:
    """A key's own rate limit as stored: "N/second|minute|hour" (canonical), "unlimited", or
    None (its roles' limit); anything else is the 422 naming ``field``."""
    if value is None:
        return None
    if value == UNLIMITED:
        return UNLIMITED
    expected = (f"{field} must be N/second, N/minute or N/hour (N from 1 to 999999999, e.g. 600/minute), "
                "\"unlimited\", or null for the roles' limit")
    if not isinstance(value, str):
        raise InvalidInput("invalid_rate_limit", expected, field)
    try:
        return str(parse_rate_limit(value))
    except ValueError:
        # Only the start of a long value is echoed: the message is one line of an error body or
        # of the CLI's stderr.
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidInput("invalid_rate_limit", f"{expected}; got {shown!r}", field) from None


def validate_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise InvalidInput("invalid_name", "name must be 1-64 characters of A-Z a-z 0-9 . _ -", field)
    return name


def validate_roles(roles: object, settings: Settings) -> tuple[str, ...]:
    valid = sorted(settings.roles)
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidInput("invalid_roles", "roles must be a list of role names", "roles",
                       {"valid_roles": valid})
    if not roles:
        raise InvalidInput("invalid_roles", "at least one role is required", "roles", {"valid_roles": valid})
    unknown = sorted({r for r in roles if r not in settings.roles})
    if unknown:
        raise InvalidInput("unknown_role",
                       f"unknown role(s) {', '.join(unknown)}; valid roles: {', '.join(valid)}", "roles",
                       {"valid_roles": valid})
    return tuple(sorted(set(roles)))


# RFC 3339 5.6 date-time: ASCII digits only (``\d`` would also take other scripts' digits) and a
# required time zone, "Z" or a numeric offset.
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
                        r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")


def parse_time(value: object, field: str, *, future: bool = True) -> datetime | None:
    """An RFC 3339 date-time as an aware UTC datetime, or the 422 naming ``field``.

    Every way a value can be wrong ends in :class:`InvalidInput`: not a string, not the RFC 3339
    shape, not a real time (month 13, second 60, offset 24:00), outside what ``datetime`` can hold
    once converted to UTC (``9999-12-31T23:59:59-01:00``, ``0001-01-01T00:00:00+01:00``), or, with
    ``future``, not after now.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("invalid_time", f"{field} must be an RFC 3339 date-time string", field)
    text = value.strip()
    if not _DATE_TIME.fullmatch(text):
        raise InvalidInput("invalid_time", f"{field} must be an RFC 3339 date-time with a time zone, "
                                            "e.g. 2030-01-31T12:00:00Z", field)
    try:
        parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        raise InvalidInput("invalid_time", f"{field} is not a valid date-time", field) from None
    except OverflowError:
        raise InvalidInput("invalid_time", f"{field} is outside the supported range "
                                            "(years 0001-9999 in UTC)", field) from None
    if future and parsed <= datetime.now(UTC):
        raise InvalidInput("invalid_time", f"{field} must be in the future", field)
    return parsed


class KeyManager:
    def __init__(self, settings: Settings, store: KeyStore, hasher: KeyHasher, audit: AuditLog,
                 on_change: ChangeHook | None = None) -> None:
        self._settings = settings
        self._store = store
        self._hasher = hasher
        self._audit = audit
        self._on_change = on_change

    def _scope(self, workspace: str | None) -> str | None:
        """The workspace an operation is limited to: the one given, else the configured one;
        None (every workspace) only with [workspaces] and no workspace given (the CLI)."""
        if workspace is not None:
            return workspace
        return None if self._settings.multi_workspace else self._settings.workspace

    async def create(self, *, name: object, roles: object, actor: str, client: str | None,
                     expires_at: object = None, rate_limit: object = None, extra_audit: Sequence[Any] = (),
                     details: Mapping[str, Any] | None = None, workspace: str | None = None) -> tuple[KeyRecord, str]:
        """Create a key in ``workspace`` (required with [workspaces]); returns the record and the
        full key (the only time it exists)."""
        home = self._scope(workspace)
        if home is None:
            raise InvalidInput("missing_workspace", "workspace is required: keys belong to one workspace",
                               "workspace")
        valid_name = validate_name(name)
        valid_roles = validate_roles(roles, self._settings)
        expiry = parse_time(expires_at, "expires_at")
        own_limit = validate_rate_limit(rate_limit)
        for _ in range(5):  # a lookup-id collision (62**8 space) is astronomically rare; retry
            key = generate_key()
            key_hash = await asyncio.to_thread(self._hasher.hash, key.full)
            now = utcnow()
            record = KeyRecord(
                id=new_key_id(), lookup_id=key.lookup_id, name=valid_name, roles=valid_roles,
                workspace=home, status=ENABLED, created_at=now, created_by=actor,
                key_hash=key_hash, expires_at=expiry, rate_limit=own_limit,
            )
            event = self._audit.event(KEY_CREATED, actor, key_id=record.id, key_name=record.name,
                                      client=client, workspace=home, details={"roles": list(valid_roles),
                                                              "expires_at": to_rfc3339(expiry),
                                                              "rate_limit": own_limit,
                                                              **(details or {})})
            try:
                stored = await self._store.insert_key(record, [event, *extra_audit])
            except DuplicateName:
                raise NameTaken(valid_name) from None
            except DuplicateLookupId:
                continue
            self._audit.emitted(event)
            for extra in extra_audit:
                self._audit.emitted(extra)
            return stored, key.full
        raise StoreError("could not allocate a key id")

    async def get(self, key_id: str, workspace: str | None = None) -> KeyRecord:
        """The key, if it is in ``workspace`` (see :meth:`_scope`); another workspace's key is
        not found, exactly as a key that does not exist."""
        record = await self._store.get_key(key_id)
        scope = self._scope(workspace)
        if record is None or (scope is not None and record.workspace != scope):
            raise KeyNotFound(key_id)
        return record

    async def find(self, ref: str, workspace: str | None = None) -> KeyRecord:
        """The key whose id, or else whose name, is ``ref`` (the CLI takes either), in
        ``workspace`` (see :meth:`_scope`). Names are unique only within a workspace, so with
        every workspace in scope a key is found by its id alone."""
        scope = self._scope(workspace)
        record = await self._store.get_key(ref)
        if record is not None and (scope is None or record.workspace == scope):
            return record
        if scope is None:
            if ref.startswith("key_"):
                raise KeyNotFound(ref)
            raise InvalidInput("missing_workspace", f"no key with id {ref!r}; a key named by its name needs its "
                                                    "workspace (names are unique only within one)", "workspace")
        record = await self._store.get_key_by_name(scope, ref)
        if record is None:
            raise KeyNotFound(ref, by_name=True)
        return record

    async def page(self, query: KeyQuery) -> KeyPage:
        """One page of ``query.workspace``'s keys (sidecar.keys.listing); of every workspace when
        it is None, which only [workspaces] allows (the CLI without --workspace)."""
        if not self._settings.multi_workspace and query.workspace != self._settings.workspace:
            raise ValueError("a key query names another workspace")
        return await self._store.page_keys(query)

    async def pages(self, query: KeyQuery | None = None) -> AsyncIterator[list[KeyRecord]]:
        """Every page of ``query`` (default: all keys in scope, see :meth:`_scope`, oldest first),
        one store read each."""
        query = query or KeyQuery(self._scope(None), limit=MAX_LIMIT)
        while True:
            page = await self.page(query)
            yield page.keys
            if page.next is None:
                return
            query = replace(query, after=page.next)

    async def list(self, workspace: str | None = None) -> list[KeyRecord]:
        """Every key of ``workspace`` (see :meth:`_scope`), oldest first, read a page at a time."""
        query = KeyQuery(self._scope(workspace), limit=MAX_LIMIT)
        return [record async for page in self.pages(query) for record in page]

    async def set_status(self, key_id: str, status: str, *, actor: str, client: str | None,
                         details: Mapping[str, Any] | None = None, workspace: str | None = None) -> KeyRecord:
        current = await self.get(key_id, workspace)
        action = KEY_DISABLED if status == DISABLED else KEY_ENABLED
        event = self._audit.event(action, actor, key_id=current.id, key_name=current.name, client=client,
                                  workspace=current.workspace,
                                  details={"previous_status": current.status, **(details or {})})
        return self._changed(key_id, await self._store.set_status(key_id, status, utcnow(), event), event)

    async def set_rate_limit(self, key_id: str, rate_limit: object, *, actor: str, client: str | None,
                             workspace: str | None = None) -> KeyRecord:
        """Give the key its own rate limit, or (None) hand it back to its roles'. The change is
        audited (``key.updated``) and every process's cache reads the key again, so its next
        request is held to the new limit (docs/reference/limits.md)."""
        current = await self.get(key_id, workspace)
        wanted = validate_rate_limit(rate_limit)
        if wanted == current.rate_limit:
            return current  # nothing changes: no event, no cache churn
        event = self._audit.event(KEY_UPDATED, actor, key_id=current.id, key_name=current.name, client=client,
                                  workspace=current.workspace,
                                  details={"rate_limit": {"from": current.rate_limit, "to": wanted}})
        return self._changed(key_id, await self._store.set_rate_limit(current.id, wanted, event), event)

    def _changed(self, key_id: str, updated: KeyRecord | None, event: AuditRecord) -> KeyRecord:
        """After a change was written: tell the running proxy before answering, so the key's
        next request sees it and a disable cuts its open streams (docs/reference/keys.md: no
        cache delay)."""
        if updated is None:
            raise KeyNotFound(key_id)
        if self._on_change is not None:
            self._on_change(updated)
        self._audit.emitted(event)
        return updated

    async def rotate(self, key_id: str, *, name: object, actor: str, client: str | None,
                     disable_old_at: object = None, workspace: str | None = None) -> tuple[KeyRecord, str, KeyRecord]:
        """New key with the old key's roles and own rate limit (in its workspace); optionally
        schedule the old one's disable."""
        old = await self.get(key_id, workspace)
        when = parse_time(disable_old_at, "disable_old_at")
        valid_name = validate_name(name)
        # Roles no longer in the config are dropped; at least one must remain.
        roles = [r for r in old.roles if r in self._settings.roles]
        rotated = self._audit.event(KEY_ROTATED, actor, key_id=old.id, key_name=old.name, client=client,
                                    workspace=old.workspace,
                                    details={"new_key_name": valid_name, "disable_old_at": to_rfc3339(when)})
        new, full = await self.create(name=valid_name, roles=roles, actor=actor, client=client,
                                      rate_limit=old.rate_limit, extra_audit=[rotated],
                                      details={"rotated_from": old.id}, workspace=old.workspace)
        if when is not None:
            await self._store.schedule_disable(old.id, when)
            old = await self.get(old.id, old.workspace)
            if self._on_change is not None:
                self._on_change(old)
        return new, full, old


async def run_scheduled_disables(manager: KeyManager, store: KeyStore,
                                 notify: Callable[[KeyRecord], Awaitable[None]] | None = None) -> int:
    """Disable keys whose scheduled time (from a rotation) has come; returns how many."""
    due = await store.due_scheduled_disables(utcnow())
    for record in due:
        updated = await manager.set_status(record.id, DISABLED, actor="scheduler", client=None,
                                           details={"reason": "scheduled by rotation"})
        if notify is not None:
            await notify(updated)
    return len(due)
