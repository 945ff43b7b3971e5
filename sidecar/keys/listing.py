"""Listing a workspace's keys a page at a time (docs/reference/admin-api.md, Listing keys).

A :class:`KeyQuery` says which keys (name substring, status, role), in which order (name,
created, last used; either direction) and how many. Both stores answer it with a keyset
("seek") page: rows are read in the order of an index on ``(workspace, sort column, id)`` from
just after where the previous page ended, and reading stops after ``limit + 1`` rows. No page
sorts or counts the whole workspace, so page 100 costs what page 1 costs. A query of every
workspace (``workspace=None``: the CLI with [workspaces] and no --workspace) seeks on
``(sort column, id)`` the same way; names repeat across workspaces, so there the id breaks ties
for the name order too.

Where a page ended travels as an opaque cursor: base64url of ``[sort, value, id]``. It names its
sort, so a cursor is refused with another sort rather than silently meaning something else.
Cursors hold only what the page already showed (a name, a time, a key id), never a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, replace

from sidecar.keys.errors import InvalidInput
from sidecar.keys.records import DISABLED, ENABLED, KeyRecord, from_rfc3339, to_rfc3339

SORTS = ("name", "created", "last_used")
DEFAULT_SORT = "created"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
STATUSES = (ENABLED, DISABLED)

# What a key name may contain (sidecar.keys.manager.NAME_RULE): a search for anything else
# cannot match, so it is answered without asking the store.
_SEARCHABLE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ROLE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_LIMIT = re.compile(r"[0-9]{1,18}")
# Longest cursor ever made: a 64-character name or a time, a key id, the sort, JSON and base64.
_MAX_CURSOR = 400


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the last key's sort value (a name, or an RFC 3339 time; None for a
    key never used) and its id, which breaks ties between equal values."""

    value: str | None
    key_id: str


@dataclass(frozen=True, slots=True)
class KeyQuery:
    workspace: str | None           # None: every workspace (only with [workspaces]: the CLI)
    search: str | None = None       # name substring, case-insensitive
    status: str | None = None       # "enabled" / "disabled"
    role: str | None = None         # keys that have this role
    sort: str = DEFAULT_SORT        # one of SORTS
    descending: bool = False
    limit: int = DEFAULT_LIMIT
    after: Position | None = None

    @property
    def matches_nothing(self) -> bool:
        """A search no key name can contain (a space, a character outside the name alphabet,
        longer than a name): the answer is an empty page, without a query."""
        return self.search is not None and not _SEARCHABLE.fullmatch(self.search)

    @property
    def sort_token(self) -> str:
        return ("-" if self.descending else "") + self.sort


@dataclass(frozen=True, slots=True)
class KeyPage:
    keys: list[KeyRecord]
    next: Position | None       # None: this was the last page


def position_of(record: KeyRecord, sort: str) -> Position:
    """The position just after ``record`` in ``sort`` order."""
    if sort == "name":
        return Position(record.name, record.id)
    if sort == "created":
        return Position(to_rfc3339(record.created_at), record.id)
    return Position(to_rfc3339(record.last_used_at), record.id)


def page_from_rows(rows: list[KeyRecord], query: KeyQuery) -> KeyPage:
    """The page for ``rows`` read with ``LIMIT query.limit + 1``: the extra row only says that
    there is more."""
    if len(rows) > query.limit:
        rows = rows[:query.limit]
        return KeyPage(rows, position_of(rows[-1], query.sort))
    return KeyPage(rows, None)


def encode_cursor(query: KeyQuery, position: Position) -> str:
    raw = json.dumps([query.sort_token, position.value, position.key_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput("invalid_parameter", message, field)


def decode_cursor(text: str, sort_token: str) -> Position:
    """The position a cursor from :func:`encode_cursor` names, or the refusal naming ``cursor``."""
    if len(text) > _MAX_CURSOR:
        raise _bad("cursor", "cursor is not one this API made")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        sort, value, key_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):  # ValueError: also bad UTF-8 and JSON
        raise _bad("cursor", "cursor is not one this API made; start again without it") from None
    if not isinstance(sort, str) or not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise _bad("cursor", "cursor is not one this API made; start again without it")
    if sort != sort_token:
        raise _bad("cursor", f"cursor belongs to sort={sort}, not sort={sort_token}; start again without it")
    bare = sort.lstrip("-")
    if bare == "name":
        valid = isinstance(value, str) and _SEARCHABLE.fullmatch(value) is not None
    else:
        valid = (value is None and bare == "last_used") or (isinstance(value, str) and _is_time(value))
    if not valid:
        raise _bad("cursor", "cursor is not one this API made; start again without it")
    return Position(value, key_id)


def _is_time(text: str) -> bool:
    try:
        return to_rfc3339(from_rfc3339(text)) == text
    except (ValueError, OverflowError):
        return False


def parse_limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIMIT
    # ASCII digits only: int() would also take "²" or "١٢".
    if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise _bad("limit", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def key_query(workspace: str | None, roles: Collection[str], *, search: str | None = None, status: str | None = None,
              role: str | None = None, sort: str | None = None, limit: str | int | None = None,
              cursor: str | None = None) -> KeyQuery:
    """A validated query from request or command-line values; each refusal is an
    :class:`InvalidInput` with code ``invalid_parameter`` naming the parameter.

    ``roles`` are the configured role names: a role filter outside them is a typo, not a query
    that happens to match nothing.
    """
    if status in ("", None):
        status = None
    elif status not in STATUSES:
        raise _bad("status", f"status must be one of {', '.join(STATUSES)}")
    if role in ("", None):
        role = None
    elif role not in roles or not _ROLE.fullmatch(role):
        raise InvalidInput("invalid_parameter", f"unknown role; valid roles: {', '.join(sorted(roles))}", "role",
                           {"valid_roles": sorted(roles)})
    token = sort or DEFAULT_SORT
    bare = token.removeprefix("-")
    if bare not in SORTS:
        raise _bad("sort", f"sort must be one of {', '.join(s for b in SORTS for s in (b, '-' + b))}")
    count = limit if isinstance(limit, int) else parse_limit(limit)
    if not 1 <= count <= MAX_LIMIT:
        raise _bad("limit", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    query = KeyQuery(workspace=workspace, search=search or None, status=status, role=role, sort=bare,
                     descending=token.startswith("-"), limit=count)
    if cursor:
        query = replace(query, after=decode_cursor(cursor, query.sort_token))
    return query
