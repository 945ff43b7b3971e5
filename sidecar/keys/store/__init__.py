"""Key stores: :func:`open_store` picks the backend from the settings (``store.url``)."""

from __future__ import annotations

from sidecar.keys.store.base import KeyStore
from sidecar.settings import Settings


def store_for(settings: Settings) -> KeyStore:
    """SQLite in ``data_dir`` when ``store.url`` is empty (one replica); else the shared
    PostgreSQL store. Not opened yet: the caller opens (and migrates) it."""
    if not settings.store.url:
        from sidecar.keys.store.sqlite import SQLiteKeyStore
        return SQLiteKeyStore(settings.database_path)
    # Imported only when configured: a SQLite deployment never loads the PostgreSQL driver.
    from sidecar.keys.store.postgres import PostgresKeyStore
    return PostgresKeyStore(settings.store.url, max_connections=settings.store.pool_size,
                            min_connections=1)
