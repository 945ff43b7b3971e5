"""``toolio-sidecar store copy``: move keys and the audit log from one store to another (from
the one-pod SQLite store to the shared PostgreSQL one, docs/operations.md, "Moving from SQLite").

Idempotent: keys and audit events keep their ids, and what the target already holds is left
alone, so a second run copies only what is new. Different data under the same id (or the same
name or lookup id under another id) is refused before anything is written: the target is never
overwritten. A key's ``last_used_at`` may have moved on in the source since an earlier copy;
the target keeps the newer time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.keys.records import AuditRecord, KeyRecord
from sidecar.keys.store.base import KeyStore, StoreError

AUDIT_BATCH = 1000


class CopyConflict(StoreError):
    """The target holds different data under an id (or name) the source uses."""


@dataclass
class CopyReport:
    keys_copied: int = 0
    keys_already_there: int = 0
    events_copied: int = 0
    events_already_there: int = 0


def _comparable(record: KeyRecord) -> KeyRecord:
    # The revision is each store's own counter; last use only moves forward (merged, not compared).
    return replace(record, revision=0, last_used_at=None)


def _same_event(a: AuditRecord, b: AuditRecord) -> bool:
    return (a.time, a.action, a.actor, a.workspace, a.key_id, a.key_name, a.client, dict(a.details)) == \
        (b.time, b.action, b.actor, b.workspace, b.key_id, b.key_name, b.client, dict(b.details))


async def copy_store(source: KeyStore, target: KeyStore) -> CopyReport:
    """Copy every key and audit event of ``source`` into ``target`` (both open)."""
    report = CopyReport()
    keys = await source.all_keys()
    present = {k.id: k for k in await target.all_keys()}
    by_lookup = {k.lookup_id: k.id for k in present.values()}
    by_name = {(k.workspace, k.name): k.id for k in present.values()}
    conflicts: list[str] = []
    new_keys: list[KeyRecord] = []
    newer_use = {}
    for record in keys:
        there = present.get(record.id)
        if there is None:
            if by_lookup.get(record.lookup_id, record.id) != record.id or \
                    by_name.get((record.workspace, record.name), record.id) != record.id:
                conflicts.append(f"key {record.id} ({record.name}): its name or lookup id belongs to another key")
            else:
                new_keys.append(record)
            continue
        if _comparable(there) != _comparable(record):
            conflicts.append(f"key {record.id} ({record.name}) differs in the target")
            continue
        report.keys_already_there += 1
        if record.last_used_at is not None and (there.last_used_at is None or record.last_used_at > there.last_used_at):
            newer_use[record.id] = record.last_used_at
    # The audit log, page by page, compared with whatever the target has under the same ids.
    new_events: list[AuditRecord] = []
    after = 0
    while True:
        page = await source.audit_page(after, AUDIT_BATCH)
        if not page:
            break
        first = page[0].id
        assert first is not None
        theirs = {e.id: e for e in await target.audit_page(first - 1, AUDIT_BATCH)}
        for event in page:
            there_event = theirs.get(event.id)
            if there_event is None:
                new_events.append(event)
            elif _same_event(there_event, event):
                report.events_already_there += 1
            else:
                conflicts.append(f"audit event {event.id} differs in the target")
        last = page[-1].id
        assert last is not None
        after = last
    if conflicts:
        shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise CopyConflict(f"the target holds different data, nothing was copied: {shown}")
    added, _ = await target.import_records(new_keys, [])
    report.keys_copied = added
    for start in range(0, len(new_events), AUDIT_BATCH):
        _, events = await target.import_records([], new_events[start:start + AUDIT_BATCH])
        report.events_copied += events
    if newer_use:
        await target.touch_last_used(newer_use)
    return report
