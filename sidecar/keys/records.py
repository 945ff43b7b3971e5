"""The key domain's records: keys and audit events as the store keeps them, and the time format
(RFC 3339 UTC, millisecond precision) they carry everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ENABLED = "enabled"


DISABLED = "disabled"


def utcnow() -> datetime:
    now = datetime.now(UTC)
    # Millisecond precision: what RFC 3339 strings in the store and the API carry.
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def to_rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` suffix, millisecond precision (docs/reference/admin-api.md: times are RFC 3339 UTC)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_rfc3339(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    lookup_id: str
    name: str
    roles: tuple[str, ...]
    workspace: str
    status: str
    created_at: datetime
    created_by: str
    key_hash: str = field(repr=False)
    last_used_at: datetime | None = None
    disabled_at: datetime | None = None
    expires_at: datetime | None = None
    disable_at: datetime | None = None
    revision: int = 0
    # This key's own rate limit, replacing its roles': "N/second|minute|hour", or "unlimited";
    # None: its roles' (docs/reference/limits.md).
    rate_limit: str | None = None

    def deadline(self) -> float | None:
        """Epoch seconds after which the key no longer authenticates (expiry or scheduled disable)."""
        times = [t.timestamp() for t in (self.expires_at, self.disable_at) if t is not None]
        return min(times) if times else None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: datetime
    action: str
    actor: str
    workspace: str
    key_id: str | None = None
    key_name: str | None = None
    client: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": to_rfc3339(self.time),
            "action": self.action,
            "actor": self.actor,
            "workspace": self.workspace,
            "key_id": self.key_id,
            "key_name": self.key_name,
            "client": self.client,
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class ToolUsage:
    """``tool.called`` events of one key and tool in a time window, by outcome."""

    tool: str
    allowed: int
    denied: int

    def as_json(self) -> dict[str, Any]:
        return {"tool": self.tool, "allowed": self.allowed, "denied": self.denied}
