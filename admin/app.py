"""The admin listener's key-management routes: the JSON API, login sessions and the page.

``install(app, services)`` adds to the ops app (``sidecar.runtime.ops_app.create_ops_app``):

* one middleware for everything under ``/admin``: JSON errors (also for aiohttp's own 404 /
  405 / 413), ``Cache-Control: no-store`` and the page's security headers;
* the session endpoints (login / current / logout) here, the key endpoints in ``admin.api``;
* ``GET /admin/`` and its static files, read once from package data (no build step, no CDN).
"""

from __future__ import annotations

from html import escape
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from admin.access import Access, api_error_response
from admin.api import API, KeyApi, read_object
from admin.session import SessionStore
from sidecar.errors import ApiError, AuthError, RateLimited, SidecarError
from sidecar.keys.audit import ADMIN_LOGIN, ADMIN_LOGIN_FAILED, ADMIN_LOGOUT
from sidecar.keys.errors import KeyDomainError
from sidecar.keys.format import KeyFormatError, parse_key, preview
from sidecar.runtime.services import Services
from sidecar.runtime.web import json_response

PREFIX = "/admin"

# The page needs nothing but its own files: no inline script or style, no third party
# (CSP Level 3). frame-ancestors stops clickjacking of the Disable menu; form-action and
# base-uri close the remaining injection sinks.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Nothing under /admin may be kept by a browser or shared cache: key lists, one-time keys,
    # CSRF tokens (OWASP Session Management: prevent caching of sensitive pages).
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
HSTS = "max-age=31536000"

_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                  ".svg": "image/svg+xml"}


def _is_admin_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("admin").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return files


def _http_error(exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        resp = json_response(405, {"error": "method_not_allowed",
                                   "message": f"{exc.method} is not allowed here; allowed: "
                                              f"{', '.join(sorted(exc.allowed_methods))}"})
        resp.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return resp
    if isinstance(exc, web.HTTPNotFound):
        return json_response(404, {"error": "not_found", "message": "no such admin resource"})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return json_response(413, {"error": "body_too_large", "message": "the request body is too large"})
    code = exc.reason.lower().replace(" ", "_") or "error"
    return json_response(exc.status, {"error": code, "message": exc.reason})


def _middleware(services: Services) -> Middleware:
    hsts = services.settings.admin.secure_cookies

    @web.middleware
    async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _is_admin_path(request.path):
            return await handler(request)
        try:
            resp = await handler(request)
        except (SidecarError, KeyDomainError) as exc:
            resp = api_error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _http_error(exc)
        except Exception as exc:  # one JSON 500 rather than aiohttp's HTML page; logged, not shown
            services.log.error("admin request failed", path=request.path, error=repr(exc))
            resp = json_response(500, {"error": "internal_error", "message": "internal error"})
        resp.headers.update(SECURITY_HEADERS)
        if hsts:
            # RFC 6797: only meaningful (and only honoured) over HTTPS, which secure_cookies implies.
            resp.headers["Strict-Transport-Security"] = HSTS
        return resp

    return admin_guard


class SessionApi:
    """``/admin/api/session``: sign in with an admin key, read the session, sign out."""

    def __init__(self, services: Services, access: Access) -> None:
        self._services = services
        self._access = access
        self._sessions = access.sessions

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"{API}/session", self.login)
        router.add_get(f"{API}/session", self.current, allow_head=False)
        router.add_delete(f"{API}/session", self.logout)

    async def login(self, request: web.Request) -> web.Response:
        # A login from another site is refused too (login CSRF); clients without Origin (curl)
        # are fine since they carry no ambient credential.
        self._access.require_same_origin(request, required=False)
        body = await read_object(request, ("key",))
        token = body.get("key")
        if not isinstance(token, str) or not token:
            raise ApiError(422, "missing_field", "key (an admin API key, tak_...) is required", "key")
        # A JSON "\ud800" escape decodes to a lone surrogate, which no key contains and which has
        # no UTF-8 form (RFC 8259 8.2); swap such code points for "?" so the attempt is refused
        # and counted like any other wrong key instead of failing on the way to the digest.
        token = token.encode("utf-8", "replace").decode("utf-8")
        audit = self._services.audit
        client = self._access.client(request)
        try:
            principal = await self._access.authenticate_token(request, token)
        except RateLimited:
            # The failure budget is spent: answer 429 without writing a row per attempt.
            raise
        except AuthError as exc:
            details = {"reason": exc.reason}
            try:
                details["key_preview"] = preview(parse_key(token.strip()).lookup_id)
            except KeyFormatError:
                pass
            await audit.record(audit.event(ADMIN_LOGIN_FAILED, "anonymous", client=client, details=details))
            raise ApiError(401, "invalid_key", "the key is unknown, wrong, disabled or expired", "key") from None
        if not self._access.has_permission(principal.permissions):
            await audit.record(audit.event(ADMIN_LOGIN_FAILED, principal.name, key_id=principal.key_id,
                                           key_name=principal.name, client=client, workspace=principal.workspace,
                                           details={"reason": "missing_permission"}))
            raise self._access.forbidden()
        # OWASP: a new session id on every login, and any session this browser had is ended.
        self._sessions.delete(request.cookies.get(self._sessions.cookie_name))
        await audit.record(audit.event(ADMIN_LOGIN, principal.name, key_id=principal.key_id,
                                       key_name=principal.name, client=client, workspace=principal.workspace))
        raw, session = self._sessions.create(principal.key_id, principal.name, principal.workspace)
        resp = json_response(200, self._sessions.describe(session))
        self._set_cookie(resp, raw)
        return resp

    async def current(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request, session_only=True)
        assert caller.session is not None
        return json_response(200, self._sessions.describe(caller.session))

    async def logout(self, request: web.Request) -> web.Response:
        caller = await self._access.caller(request, session_only=True)
        self._sessions.delete(request.cookies.get(self._sessions.cookie_name))
        audit = self._services.audit
        await audit.record(audit.event(ADMIN_LOGOUT, caller.name, key_id=caller.key_id, key_name=caller.name,
                                       client=caller.client, workspace=caller.workspace))
        resp = json_response(200, {"logged_out": True})
        self._clear_cookie(resp)
        return resp

    def _cookie_path(self) -> str:
        # A __Host- cookie must have Path=/ (RFC 6265bis 4.1.3.2); otherwise scope it to /admin.
        return "/" if self._sessions.secure else PREFIX

    def _set_cookie(self, resp: web.Response, raw: str) -> None:
        # No Max-Age: a browser-session cookie (OWASP prefers non-persistent session cookies);
        # the server enforces the idle and absolute timeouts itself.
        resp.set_cookie(self._sessions.cookie_name, raw, path=self._cookie_path(), httponly=True,
                        secure=self._sessions.secure, samesite="Strict")

    def _clear_cookie(self, resp: web.Response) -> None:
        resp.set_cookie(self._sessions.cookie_name, "", path=self._cookie_path(), httponly=True,
                        secure=self._sessions.secure, samesite="Strict", max_age=0,
                        expires="Thu, 01 Jan 1970 00:00:00 GMT")


class Page:
    """``GET /admin/`` and ``/admin/static/*``: files read once from package data."""

    _SESSION_MARK = b'<meta name="toolio-session" content="none">'
    _PERMISSION_MARK = b'<code id="login-permission">org:settings</code>'

    def __init__(self, sessions: SessionStore, permission: str) -> None:
        self._sessions = sessions
        self._files = _load_static()
        html = self._files["index.html"][0]
        code = f'<code id="login-permission">{escape(permission)}</code>'.encode()
        self._index = {
            False: html.replace(self._PERMISSION_MARK, code),
            True: html.replace(self._PERMISSION_MARK, code).replace(
                self._SESSION_MARK, b'<meta name="toolio-session" content="active">'),
        }

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(PREFIX, self.redirect)
        router.add_get(PREFIX + "/", self.index)
        router.add_get(PREFIX + "/static/{name}", self.static)

    async def redirect(self, _: web.Request) -> web.Response:
        return web.Response(status=308, headers={"Location": PREFIX + "/"})

    async def index(self, request: web.Request) -> web.Response:
        # Tell the script whether to ask for the session, so a signed-out visit makes no request
        # that fails. Only a hint: the API checks the session itself.
        live = self._sessions.get(request.cookies.get(self._sessions.cookie_name)) is not None
        return web.Response(body=self._index[live], content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        found = self._files.get(request.match_info["name"])
        if found is None:
            raise ApiError(404, "not_found", "no such file")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8")


def install(app: web.Application, services: Services) -> None:
    """Add the admin API and page to the admin listener's app."""
    sessions = SessionStore(services.settings.admin)
    access = Access(services, sessions)
    app.middlewares.append(_middleware(services))
    SessionApi(services, access).add_routes(app.router)
    KeyApi(services, access).add_routes(app.router)
    Page(sessions, services.settings.admin.required_permission).add_routes(app.router)

