"""Which key owns which MCP session (``Mcp-Session-Id``), checked before a request is forwarded."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from cachetools import TTLCache

from sidecar.keys.records import utcnow
from sidecar.keys.store.base import KeyStore


class SessionBindings:
    """Mcp-Session-Id -> the key id that opened it (MCP security best practices: bind sessions
    to the caller). The store holds the bindings, so they survive restarts and hold on every
    replica sharing it; a binding is made once, when the upstream issues the id, and never moves
    to another key. Owners read once are remembered here: a binding never changes, so a cached
    owner cannot go stale, and an active session costs no store read per request."""

    def __init__(self, store: KeyStore, maxsize: int, ttl: float) -> None:
        self._store = store
        # Forgotten here no later than the store's pruning forgets them (see Services).
        self._owners: TTLCache[str, str] = TTLCache(maxsize, ttl, timer=time.monotonic)
        self._seen: dict[str, float] = {}

    async def owner(self, session_id: str) -> str | None:
        owner = self._owners.get(session_id)
        if owner is None:
            owner = await self._store.session_owner(session_id)
            if owner is not None:
                self._owners[session_id] = owner
        return owner

    def seen(self, session_id: str) -> None:
        """Its owner used it: it stays bound (only the owner's use keeps a binding alive)."""
        self._seen[session_id] = time.time()

    async def bind(self, session_id: str, key_id: str) -> str:
        """Bind (unless bound already) and return the owner."""
        owner = self._owners.get(session_id)
        if owner is None:
            owner = await self._store.bind_session(session_id, key_id, utcnow())
            self._owners[session_id] = owner
        return owner

    def take_seen(self) -> dict[str, datetime]:
        """Last-use times since the previous call, for one batched store write."""
        seen, self._seen = self._seen, {}
        return {k: datetime.fromtimestamp(t, UTC) for k, t in seen.items()}
