"""The :class:`KeyStore` interface every backend implements (SQLite, PostgreSQL) and its errors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from sidecar.keys.listing import KeyPage, KeyQuery
from sidecar.keys.records import AuditRecord, KeyRecord, ToolUsage

# How many tools :meth:`KeyStore.tool_activity` reports at most (denied calls may name anything).
TOOL_ACTIVITY_LIMIT = 200


class StoreError(Exception):
    """The store cannot do what was asked (not a validation problem)."""


class DuplicateName(StoreError):
    pass


class DuplicateLookupId(StoreError):
    pass


class ChangeFeed(Protocol):
    """Pushed key changes from a shared store (see :meth:`KeyStore.listen`)."""

    @property
    def delivered_revision(self) -> int:
        """The newest revision handed to the callback."""

    def is_current(self, max_staleness_seconds: float) -> bool:
        """Connected, and confirmed to have delivered every change within that many seconds."""

    async def close(self) -> None: ...


class KeyStore(ABC):
    """What the sidecar needs from a store; every write that changes a key carries its audit row
    and both land in one transaction (an API success means both are durable)."""

    # Shared by several processes over a network (PostgreSQL), rather than one file on one pod.
    shared = False
    # What the store is, for logs and errors: never a password.
    description = "store"

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the store is not usable (readiness)."""

    @abstractmethod
    async def migrate(self) -> int:
        """Apply pending schema migrations (safe from several processes at once); returns how
        many steps this call applied."""

    async def listen(self, callback: Callable[[int], None]) -> ChangeFeed | None:
        """Push key changes: ``callback(revision)`` after each commit and after every reconnect.
        None where the store has no push channel (SQLite: readers poll ``external_change_marker``)."""
        return None

    @abstractmethod
    async def get_or_create_secret(self, name: str, make: Callable[[], str]) -> str:
        """The value stored under ``name``, or ``make()``'s value stored now; when several
        processes race, the first commit wins and everyone gets that value."""

    @abstractmethod
    async def put_secret(self, name: str, value: str) -> None:
        """Replace the value stored under ``name`` (a rotated signing key set)."""

    # -- moving between stores (``toolio-sidecar store copy``) ------------------------------------

    @abstractmethod
    async def all_keys(self) -> list[KeyRecord]:
        """Every key of every workspace, hashes included, oldest first."""

    @abstractmethod
    async def audit_page(self, after_id: int, limit: int) -> list[AuditRecord]:
        """Audit events of every workspace with ``id > after_id``, oldest first."""

    @abstractmethod
    async def import_records(self, keys: Sequence[KeyRecord], audit: Sequence[AuditRecord]) -> tuple[int, int]:
        """Insert keys and audit events keeping their ids, skipping ids already present; one
        transaction. Returns (keys added, events added)."""

    @abstractmethod
    async def insert_key(self, record: KeyRecord, audit: Sequence[AuditRecord]) -> KeyRecord: ...

    @abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def get_by_lookup_id(self, lookup_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def get_key_by_name(self, workspace: str, name: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self, workspace: str) -> list[KeyRecord]: ...

    @abstractmethod
    async def page_keys(self, query: KeyQuery) -> KeyPage:
        """One page of a workspace's keys, or of every workspace's when ``query.workspace`` is
        None (sidecar.keys.listing): read in index order from just after ``query.after``, at most
        ``query.limit`` keys."""

    @abstractmethod
    async def set_status(self, key_id: str, status: str, now: datetime,
                         audit: AuditRecord) -> KeyRecord | None:
        """Enable or disable (never delete); clears a scheduled disable when enabling."""

    @abstractmethod
    async def set_rate_limit(self, key_id: str, rate_limit: str | None,
                             audit: AuditRecord) -> KeyRecord | None:
        """Set the key's own rate limit (None: its roles'), bumping its revision so every
        process's cache reads it again; None when there is no such key."""

    @abstractmethod
    async def schedule_disable(self, key_id: str, when: datetime | None) -> None: ...

    @abstractmethod
    async def due_scheduled_disables(self, now: datetime) -> list[KeyRecord]: ...

    @abstractmethod
    async def due_expiries(self, now: datetime) -> list[KeyRecord]:
        """Keys whose ``expires_at`` has passed and whose expiry has no audit event yet."""

    @abstractmethod
    async def note_expired(self, key_id: str, audit: AuditRecord) -> bool:
        """Write the expiry's audit event unless another process already did; True if written."""

    @abstractmethod
    async def update_hash(self, key_id: str, key_hash: str) -> None: ...

    @abstractmethod
    async def touch_last_used(self, last_used: Mapping[str, datetime]) -> None: ...

    @abstractmethod
    async def append_audit(self, events: Iterable[AuditRecord]) -> None: ...

    @abstractmethod
    async def list_audit(self, workspace: str, limit: int, before: int | None, *,
                         action: str | None = None, key_id: str | None = None) -> list[AuditRecord]:
        """The workspace's events, newest first: ``id < before`` when given, and only those of
        ``action`` and of ``key_id`` when given (both: both must match)."""

    @abstractmethod
    async def tool_activity(self, workspace: str, key_id: str, since: datetime) -> list[ToolUsage]:
        """The key's ``tool.called`` events at or after ``since``, counted per tool and outcome;
        the most called tools first, at most ``TOOL_ACTIVITY_LIMIT`` of them."""

    @abstractmethod
    async def prune_audit(self, older_than: datetime, batch: int) -> int:
        """Delete at most ``batch`` audit events (every workspace) whose time is before
        ``older_than``, in one short transaction; returns how many. The database refuses to delete
        an event younger than one day (a trigger, in both stores), so such rows are never asked
        for, whatever ``older_than`` says."""

    @abstractmethod
    async def changes_since(self, revision: int) -> tuple[int, list[KeyRecord]]:
        """Keys changed after ``revision`` and the newest revision (for cross-process sync)."""

    @abstractmethod
    async def external_change_marker(self) -> int:
        """A number that moves when another connection/process commits (cheap to poll)."""

    @abstractmethod
    async def count_by_status(self, workspace: str | None) -> dict[str, int]:
        """Keys per status in ``workspace``; None: in every workspace ([workspaces] mode)."""

    # MCP session bindings (MCP security best practices: bind a session to its caller). Kept in
    # the store so that a binding holds after a restart and on every replica sharing the store.

    @abstractmethod
    async def bind_session(self, session_id: str, key_id: str, now: datetime) -> str:
        """Bind ``session_id`` to ``key_id`` unless it is bound already; an existing binding is
        never moved. Returns the owner: the existing one, or ``key_id``."""

    @abstractmethod
    async def session_owner(self, session_id: str) -> str | None: ...

    @abstractmethod
    async def touch_sessions(self, seen: Mapping[str, datetime]) -> None:
        """Record when bound sessions were last used (batched by the caller)."""

    @abstractmethod
    async def prune_sessions(self, older_than: datetime) -> int:
        """Forget bindings not used since ``older_than``; returns how many."""
