"""Who is calling the admin API, and may they?

Two ways in (docs/reference/admin-api.md):

* ``Authorization: Bearer <admin key>``: checked by the proxy's own :class:`Authenticator`
  (same cache, same failure budgets, so brute force meets the same 429). No CSRF check: a
  browser never attaches this header on its own, so there is no ambient credential to abuse.
* the page's session cookie: an ambient credential, so every unsafe request must also prove it
  comes from the page itself: a same-origin ``Origin`` / ``Sec-Fetch-Site`` (Fetch Metadata)
  and the session's CSRF token in ``X-CSRF-Token`` (OWASP CSRF Prevention Cheat Sheet:
  synchronizer token plus origin verification). SameSite=Strict on the cookie (RFC 6265bis
  5.6.7.1) already keeps it off cross-site requests; these checks do not rely on that alone.

Either way the key must carry ``admin.required_permission``; a session is re-checked against
the store on every request, so disabling the admin key ends its sessions at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from admin.session import CSRF_HEADER, Session, SessionStore
from sidecar.errors import ApiError, MissingCredentials, RateLimited, SidecarError
from sidecar.gate.authenticator import Authenticator
from sidecar.gate.principal import Principal
from sidecar.keys.errors import KeyDomainError, KeyNotFound, NameTaken
from sidecar.keys.records import DISABLED
from sidecar.runtime.services import Services
from sidecar.runtime.web import error_response, json_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Caller:
    """An authorised admin: the key used (its name is the audit actor) and how it came in."""

    key_id: str
    name: str
    client: str
    session: Session | None = None
    # The admin key's own workspace: the API and page see and change only its keys and events.
    workspace: str = ""


def api_error(exc: KeyDomainError) -> ApiError:
    """A key-domain refusal as the admin API answers it."""
    status = 404 if isinstance(exc, KeyNotFound) else 409 if isinstance(exc, NameTaken) else 422
    return ApiError(status, exc.code, exc.message, exc.field, exc.extra)


def api_error_response(exc: SidecarError | KeyDomainError) -> web.Response:
    """Any sidecar error in the admin API's shape ``{"error", "message"[, "field"]}``."""
    if isinstance(exc, KeyDomainError):
        exc = api_error(exc)
    if isinstance(exc, ApiError):
        resp = error_response(exc)
    else:
        code = "unauthorized" if isinstance(exc, MissingCredentials) else exc.code
        resp = json_response(exc.status, {"error": code, "message": exc.description})
    if isinstance(exc, RateLimited):
        resp.headers["Retry-After"] = str(exc.retry_after)
    elif exc.status == 401:
        # RFC 9110 11.6.1: a 401 carries a challenge. Plain realm: this API's clients are
        # operators and scripts, not RFC 6750 token refreshers.
        resp.headers["WWW-Authenticate"] = 'Bearer realm="toolio"'
    return resp


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


class Access:
    def __init__(self, services: Services, sessions: SessionStore) -> None:
        self._services = services
        self.sessions = sessions
        self.permission = services.settings.admin.required_permission

    def client(self, request: web.BaseRequest) -> str:
        """The client address recorded in audit rows (trusted-proxy aware, like the proxy)."""
        proxy = self._services.proxy
        if proxy is not None:
            return proxy.client_address(request)
        return request.remote or "unknown"

    # -- bearer keys ------------------------------------------------------------------------------

    async def authenticate_token(self, request: web.Request, token: str) -> Principal:
        """Authenticate a key given in a body (login) exactly as if it came in the header, so it
        meets the same cache, failure budgets and auth.failed accounting."""
        return await self._authenticator().authenticate_token(token, request)

    async def _authenticate(self, request: web.BaseRequest) -> Principal:
        return await self._authenticator().authenticate(request)

    def _authenticator(self) -> Authenticator:
        authenticator = self._services.authenticator
        if authenticator is None:
            raise ApiError(503, "unavailable", "the sidecar is starting")
        return authenticator

    def has_permission(self, permissions: tuple[str, ...] | frozenset[str]) -> bool:
        return self.permission in permissions

    def forbidden(self) -> ApiError:
        return ApiError(403, "forbidden", f"this key lacks the {self.permission!r} permission "
                                          "needed to manage API keys")

    # -- callers ----------------------------------------------------------------------------------

    async def caller(self, request: web.Request, *, session_only: bool = False) -> Caller:
        """The authorised admin behind ``request``, or the 401 / 403 / 429 error."""
        if not session_only and "Authorization" in request.headers:
            principal = await self._authenticate(request)
            if not self.has_permission(principal.permissions):
                raise self.forbidden()
            return Caller(key_id=principal.key_id, name=principal.name, client=self.client(request),
                          workspace=principal.workspace)
        token = request.cookies.get(self.sessions.cookie_name)
        if not token:
            raise unauthorized("sign in, or send Authorization: Bearer <admin key>")
        # Fetch Metadata resource isolation: nothing cross-site may use the session, not even a
        # read (W3C Fetch Metadata Request Headers; web.dev "Protect your resources").
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise ApiError(403, "cross_site_request", "cross-site requests may not use the admin session")
        session = self.sessions.get(token)
        if session is None:
            raise unauthorized("the session has ended; sign in again")
        if request.method not in SAFE_METHODS:
            self.require_same_origin(request, required=True)
            if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
                raise ApiError(403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header")
        await self._still_admin(token, session)
        return Caller(key_id=session.key_id, name=session.key_name, client=self.client(request),
                      session=session, workspace=session.workspace)

    async def _still_admin(self, token: str, session: Session) -> None:
        # OWASP: re-validate on use. A disabled, expired or demoted key ends its sessions now,
        # not at the session's own timeout.
        record = await self._services.store.get_key(session.key_id)
        settings = self._services.settings
        usable = (record is not None and record.workspace == session.workspace
                  and record.status != DISABLED
                  and (record.deadline() is None or time.time() < (record.deadline() or 0))
                  and self.has_permission(settings.permissions_for(record.roles)))
        if not usable:
            self.sessions.delete(token)
            raise unauthorized("the key behind this session can no longer manage API keys; sign in again")

    def require_same_origin(self, request: web.BaseRequest, *, required: bool) -> None:
        """Refuse a request whose ``Origin`` / ``Sec-Fetch-Site`` says it came from elsewhere;
        with ``required``, one of them must be present and say same-origin."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site != "same-origin":
            raise ApiError(403, "cross_site_request", "cross-site requests are refused")
        origin = request.headers.get("Origin")
        if origin is not None and not self._is_own_origin(origin, request):
            raise ApiError(403, "cross_site_request", "the Origin of this request is not the admin page's")
        if required and origin is None and site is None:
            raise ApiError(403, "cross_site_request", "an Origin or Sec-Fetch-Site header is required")

    def _is_own_origin(self, origin: str, request: web.BaseRequest) -> bool:
        # RFC 6454: compare scheme and host[:port] with what this request was sent to. Behind a
        # TLS-terminating proxy the browser's scheme is https while ours is http.
        try:
            parts = urlsplit(origin.strip())
        except ValueError:  # e.g. "http://[::1": an unclosed IPv6 literal (RFC 3986 3.2.2)
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            return False
        schemes = {request.scheme}
        if self._services.settings.admin.secure_cookies:
            schemes.add("https")
        return parts.scheme in schemes and parts.netloc.lower() == request.host.lower()
