"""Server-side sessions for the admin page (OWASP Session Management Cheat Sheet).

The browser holds only a random session id in an HttpOnly cookie; the server keeps the session
in memory under the SHA-256 of that id, so a memory dump or a log line never yields a usable
cookie. Every login makes a new id (no session fixation). A session ends on logout, after
``idle`` seconds without use, or ``absolute`` seconds after login, whichever comes first.
Each session has its own CSRF token, which the page sends back as ``X-CSRF-Token``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sidecar.settings import AdminSettings

COOKIE_NAME = "toolio_admin_session"
# RFC 6265bis 4.1.3.2: a "__Host-" cookie must be Secure, have Path=/ and no Domain, so no
# sibling host or path can plant or shadow it.
SECURE_COOKIE_NAME = "__Host-toolio_admin_session"
CSRF_HEADER = "X-CSRF-Token"
# Bounded memory: logins beyond this evict the least recently used session.
MAX_SESSIONS = 10_000


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


@dataclass(slots=True)
class Session:
    key_id: str
    key_name: str
    csrf_token: str
    created: float                  # monotonic seconds
    last_seen: float                # monotonic seconds
    created_wall: float = field(default_factory=time.time)
    workspace: str = ""             # the signed-in key's: everything the page shows is scoped to it

    def idle_deadline(self, idle: float) -> float:
        return self.last_seen + idle

    def absolute_deadline(self, absolute: float) -> float:
        return self.created + absolute

    def csrf_matches(self, presented: str | None) -> bool:
        """Constant-time comparison of the presented CSRF token with this session's."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("ascii", "replace"), self.csrf_token.encode("ascii"))


def _rfc3339(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class SessionStore:
    """In-memory sessions keyed by the SHA-256 of their id."""

    def __init__(self, settings: AdminSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle = settings.session_idle_timeout_seconds
        self._absolute = settings.session_absolute_timeout_seconds
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self.cookie_name = SECURE_COOKIE_NAME if settings.secure_cookies else COOKIE_NAME
        self.secure = settings.secure_cookies

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, key_id: str, key_name: str, workspace: str = "") -> tuple[str, Session]:
        """A new session; returns the raw id (for the cookie only) and the session."""
        self._expire()
        # 256 bits from the OS CSPRNG: OWASP asks for at least 64 bits of entropy.
        token = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(key_id=key_id, key_name=key_name, csrf_token=secrets.token_urlsafe(32),
                          created=now, last_seen=now, workspace=workspace)
        self._sessions[_digest(token)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session for a cookie value, refreshing its idle timer; ``None`` if unknown
        or expired (an expired session is forgotten at once)."""
        if not token:
            return None
        digest = _digest(token)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self._clock()
        if now >= session.idle_deadline(self._idle) or now >= session.absolute_deadline(self._absolute):
            del self._sessions[digest]
            return None
        session.last_seen = now
        self._sessions.move_to_end(digest)
        return session

    def delete(self, token: str | None) -> Session | None:
        if not token:
            return None
        return self._sessions.pop(_digest(token), None)

    def _expire(self) -> None:
        now = self._clock()
        doomed = [d for d, s in self._sessions.items()
                  if now >= s.idle_deadline(self._idle) or now >= s.absolute_deadline(self._absolute)]
        for digest in doomed:
            del self._sessions[digest]

    def describe(self, session: Session) -> dict[str, object]:
        """The session as the API shows it (never the session id)."""
        now_mono = self._clock()
        now_wall = time.time()
        idle_at = now_wall + (session.idle_deadline(self._idle) - now_mono)
        absolute_at = now_wall + (session.absolute_deadline(self._absolute) - now_mono)
        return {
            "actor": session.key_name,
            "key_id": session.key_id,
            "workspace": session.workspace,
            "csrf_token": session.csrf_token,
            "created_at": _rfc3339(session.created_wall),
            "expires_at": _rfc3339(min(idle_at, absolute_at)),
            "absolute_expires_at": _rfc3339(absolute_at),
            "idle_timeout_seconds": self._idle,
        }
