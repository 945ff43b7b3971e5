"""Back up and restore toolio-sidecar's SQLite store (docs/sqlite-backup-restore.md).

Python's standard library only, so it runs inside the container image, which has no ``sqlite3``
command line tool:

    python sqlite_backup.py backup  /data/sidecar.db /data/backup.db    # while the sidecar runs
    python sqlite_backup.py restore /data/backup.db  /data/sidecar.db   # with the sidecar stopped

or piped in: ``kubectl exec -i ... -- python - backup /data/sidecar.db /data/backup.db < sqlite_backup.py``.

``backup`` uses SQLite's online backup API: a consistent snapshot that includes what is still
only in the write-ahead log (a ``cp`` of the file alone may miss it), written as one
self-contained file and checked. ``restore`` checks the backup first, then replaces the database
and drops the old write-ahead log, so nothing of the replaced state comes back.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path


class BackupError(Exception):
    pass


def check(path: Path) -> dict[str, int]:
    """Integrity-check a store file; its schema version and key count."""
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                raise BackupError(f"{path}: integrity check failed: {result}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            keys = db.execute("SELECT count(*) FROM keys").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path}: not a toolio-sidecar store ({exc})") from None
    return {"schema_version": int(version), "keys": int(keys)}


def backup(source: Path, target: Path) -> dict[str, int]:
    """Copy the live store ``source`` to ``target`` (which must not exist yet)."""
    if target.exists():
        raise BackupError(f"{target} already exists; choose a new name")
    live = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    partial = target.with_name(target.name + ".partial")
    try:
        copy = sqlite3.connect(partial)
        try:
            live.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
        finally:
            copy.close()
    finally:
        live.close()
    summary = check(partial)
    os.replace(partial, target)
    return summary


def restore(backup_file: Path, database: Path) -> dict[str, int]:
    """Put ``backup_file`` in place as ``database``. The sidecar must be stopped."""
    summary = check(backup_file)
    staged = database.with_name(database.name + ".restoring")
    staged.write_bytes(backup_file.read_bytes())
    # The old write-ahead log belongs to the replaced file: left there, SQLite would replay it.
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    os.replace(staged, database)
    return summary


def main(argv: list[str]) -> int:
    verb, paths = (argv[0], [Path(a) for a in argv[1:]]) if argv else ("", [])
    if (verb, len(paths)) not in (("backup", 2), ("restore", 2), ("check", 1)):
        print("usage: sqlite_backup.py backup LIVE.db NEW-BACKUP.db | restore BACKUP.db LIVE.db | check FILE.db",
              file=sys.stderr)
        return 2
    try:
        if verb == "backup":
            summary = backup(paths[0], paths[1])
        elif verb == "restore":
            summary = restore(paths[0], paths[1])
        else:
            summary = check(paths[0])
    except BackupError as exc:
        print(f"sqlite_backup: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({verb: str(paths[-1]), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
