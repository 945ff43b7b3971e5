"""Key and audit records for store tests, built without argon2 (the store never checks a hash)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sidecar.keys.records import ENABLED, AuditRecord, KeyRecord

T0 = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def key_record(n: int, *, name: str | None = None, workspace: str = "acme", lookup: str | None = None) -> KeyRecord:
    return KeyRecord(
        id=f"key_{n:016d}", lookup_id=lookup or f"LOOK{n:04d}", name=name or f"key-{n}", roles=("viewer",),
        workspace=workspace, status=ENABLED, created_at=T0 + timedelta(seconds=n), created_by="test",
        key_hash=f"$argon2id$fake{n}",
    )


def audit_record(action: str, key: KeyRecord | None = None, when: datetime = T0) -> AuditRecord:
    return AuditRecord(time=when, action=action, actor="test", workspace=key.workspace if key else "acme",
                       key_id=key.id if key else None, key_name=key.name if key else None,
                       details={"n": 1})
