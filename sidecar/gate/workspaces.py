"""The workspace of a public request, read from the host it was sent to ([workspaces] mode).

``workspaces.from_host`` is a host name template such as ``{workspace}.toolio.com``
(docs/reference/config.md, [workspaces]). A request's host is the ``Host`` field, or, when the
peer is one of ``proxy.trusted_proxies``, its single ``X-Forwarded-Host`` value. The host must
match the template exactly:

* compared lower-cased (RFC 9110 4.2.3: the host is case-insensitive), with the port stripped
  (``uri-host [":" port]``, RFC 9110 7.2; the port is not part of the name);
* an IPv6 literal (``[::1]:8080``) is refused before any split on ":", and an IPv4 one matches
  only a template made of digits, which no careful operator writes;
* ``{workspace}`` is exactly one DNS label (RFC 1123 2.1), so ``x.acme.toolio.com`` does not
  match, nor does a suffix (``acme.toolio.com.evil.test``) or the absolute form with a trailing
  dot (``acme.toolio.com.``): the whole name must be the template's;
* when ``workspaces.allowed`` lists names, only those.

A host that does not match gets 421 Misdirected Request (RFC 9110 15.5.20): this server is not
able to answer for that authority.
"""

from __future__ import annotations

import re

from sidecar.errors import ProxyError
from sidecar.gate.peers import ClientRequest, Network, is_trusted
from sidecar.settings import WORKSPACE_PLACEHOLDER, WorkspacesSettings

# One lower-case DNS label (RFC 1123 2.1); the same rule as settings.host_workspace_name.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PORT = re.compile(r"[0-9]{0,5}")


class MisdirectedRequest(ProxyError):
    """421: the request's host names no workspace this deployment serves."""

    def __init__(self) -> None:
        super().__init__(421, "misdirected_request",
                         "This host is not served here; use https://<workspace>.<domain>/ as given for your workspace")


def compile_template(template: str) -> re.Pattern[str]:
    """The regular expression of a validated ``from_host`` template (settings.check_host_template)."""
    before, _, after = template.lower().partition(WORKSPACE_PLACEHOLDER)
    return re.compile(re.escape(before) + f"(?P<workspace>{_LABEL})" + re.escape(after))


def host_name(host: str) -> str | None:
    """The name part of a ``uri-host [":" port]`` value, lower-cased; None for an IPv6 literal
    or a malformed port."""
    if host.startswith("["):
        return None  # an IP-literal (RFC 3986 3.2.2) is never a workspace's host
    name, colon, port = host.rpartition(":")
    if not colon:
        name = host
    elif not _PORT.fullmatch(port) or ":" in name or (port and int(port) > 65535):
        return None
    return name.lower()


class HostWorkspaces:
    """Finds the workspace of a public request, or refuses it with :class:`MisdirectedRequest`."""

    def __init__(self, settings: WorkspacesSettings, trusted: tuple[Network, ...]) -> None:
        self._pattern = compile_template(settings.from_host)
        self._allowed = settings.allowed
        self._trusted = trusted

    def match(self, host: str | None) -> str | None:
        """The workspace named by ``host`` (a ``Host`` value), or None when it names none."""
        if not host:
            return None
        name = host_name(host.strip())
        if name is None:
            return None
        found = self._pattern.fullmatch(name)
        if found is None:
            return None
        workspace = found.group("workspace")
        if self._allowed and workspace not in self._allowed:
            return None
        return workspace

    def host_of(self, request: ClientRequest) -> str | None:
        """The host the client addressed: a trusted proxy's ``X-Forwarded-Host`` if it sent one
        value, else ``Host``. Several forwarded values cannot be told apart: no host."""
        if is_trusted(request.remote, self._trusted):
            forwarded = [v.strip() for field in request.headers.getall("X-Forwarded-Host", ())
                         for v in field.split(",")]
            if len(forwarded) > 1:
                return None
            if forwarded:
                return forwarded[0]
        return request.headers.get("Host")

    def of(self, request: ClientRequest) -> str:
        """The request's workspace, or :class:`MisdirectedRequest`."""
        workspace = self.match(self.host_of(request))
        if workspace is None:
            raise MisdirectedRequest()
        return workspace
