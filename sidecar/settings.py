"""Settings: one TOML file (docs/reference/config.md) plus environment overrides for secrets.

Every value is validated here, at load, so that a bad config stops start-up with a message
naming the offending key (the CLI turns :class:`SettingsError` into exit status 2). This is
the only module that reads ``os.environ``-style mappings; callers pass ``environ`` in.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

CONFIG_ENV = "TOOLIO_SIDECAR_CONFIG"
# PEM block(s), newest first (or the HS256 secret), e.g. from a Kubernetes Secret.
SIGNING_KEYS_ENV = "TOOLIO_SIDECAR_SIGNING_KEYS"
# The shared store's URL (it carries a password), e.g. from a Kubernetes Secret.
STORE_URL_ENV = "TOOLIO_SIDECAR_STORE_URL"
# The Redis that shares rate limits between replicas (it may carry a password).
REDIS_URL_ENV = "TOOLIO_SIDECAR_REDIS_URL"

ALGORITHMS = ("ES256", "EdDSA", "HS256")
LOG_LEVELS = ("debug", "info", "warning", "error")
_ROLE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PERMISSION = re.compile(r"[A-Za-z0-9._:*-]{1,128}")
_WORKSPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# One DNS label as host names use it (RFC 1123 2.1), lower-case: a workspace read from a host.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_PART = re.compile(r"[a-z0-9-]*")
WORKSPACE_PLACEHOLDER = "{workspace}"
# A tool-name pattern: visible ASCII without spaces, as MCP tool names are (fnmatch's * ? [ ] too).
_TOOL_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")

T = TypeVar("T")

# "N/second", "N/minute" or "N/hour" (docs/reference/limits.md).
RATE_PERIODS: Mapping[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_LIMIT = re.compile(r"([1-9][0-9]{0,8})/(second|minute|hour)")
UNLIMITED = "unlimited"
REDIS_FAILURE_MODES = ("open", "closed")


class SettingsError(ValueError):
    """A config value is missing, unknown or invalid; ``key`` is its dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` requests per ``unit``, smoothly: the allowance refills continuously and
    a key at rest may spend a whole ``count`` at once (docs/reference/limits.md, Bursts)."""

    count: int
    unit: str          # "second" | "minute" | "hour"
    # Worked out once, read on every request of a limited key.
    period: float = field(init=False, compare=False)
    interval: float = field(init=False, compare=False)    # seconds between requests at the rate

    def __post_init__(self) -> None:
        period = RATE_PERIODS[self.unit]
        object.__setattr__(self, "period", period)
        object.__setattr__(self, "interval", period / self.count)

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"


def parse_rate_limit(text: str) -> RateLimit:
    """``"600/minute"`` -> RateLimit(600, "minute"); a ValueError saying what is expected."""
    match = _RATE_LIMIT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected N/second, N/minute or N/hour with N from 1 to 999999999, got {text!r}")
    return RateLimit(int(match.group(1)), match.group(2))


def most_generous(limits: list[RateLimit | None]) -> RateLimit | None:
    """The most generous of several limits; None (no limit) beats any. Equal rates: the larger
    burst."""
    best: RateLimit | None = None
    for limit in limits:
        if limit is None:
            return None
        if best is None or (limit.per_second, limit.count) > (best.per_second, best.count):
            best = limit
    return best


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: ListenAddress = ListenAddress("0.0.0.0", 8080)
    upstream: str = "http://127.0.0.1:8000"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowed_origins: frozenset[str] = frozenset()
    max_body_bytes: int = 10 * 1024 * 1024
    upstream_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 5.0
    keepalive_timeout_seconds: float = 75.0
    upstream_max_connections: int = 2048
    upstream_pool_timeout_seconds: float = 5.0
    session_binding_max: int = 100_000
    session_binding_ttl_seconds: float = 86_400.0
    # Requests one key may have in flight, open streams included; 0: no bound
    # (docs/reference/limits.md).
    max_concurrent_requests_per_key: int = 64


@dataclass(frozen=True, slots=True)
class AuthSettings:
    cache_size: int = 10_000
    negative_cache_size: int = 10_000
    negative_cache_ttl_seconds: float = 60.0
    max_concurrent_verifications: int = 2
    # Verifications waiting for one of those slots; beyond it 503 (docs/reference/config.md, [auth]).
    max_queued_verifications: int = 1024
    # Failure budgets (sidecar.gate.buckets): per client address (IPv6: its /64), per (lookup id,
    # client network), and per lookup id from networks that have already failed against it.
    failures_per_minute_per_address: int = 30
    failures_per_minute_per_lookup_id: int = 10
    failures_per_minute_per_lookup_id_total: int = 100
    last_used_flush_seconds: float = 5.0
    store_poll_seconds: float = 0.25


@dataclass(frozen=True, slots=True)
class Argon2Settings:
    time_cost: int = 2
    memory_cost_kib: int = 19_456
    parallelism: int = 1


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: ListenAddress = ListenAddress("127.0.0.1", 9090)
    required_permission: str = "org:settings"
    session_idle_timeout_seconds: float = 1800.0
    session_absolute_timeout_seconds: float = 43_200.0
    secure_cookies: bool = False


@dataclass(frozen=True, slots=True)
class SigningSettings:
    algorithm: str = "ES256"
    private_key_files: tuple[Path, ...] = ()
    issuer: str = "toolio-sidecar"
    audience: str = "toolio-mcp"
    lifetime_seconds: int = 60
    # Key material given through the environment (never written to the config file).
    env_keys: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where keys live: empty ``url`` is SQLite in ``data_dir`` (one replica); a
    ``postgresql://`` URL is shared by every replica (docs/operations.md, Several replicas)."""

    url: str = field(default="", repr=False)  # may carry a password: never in a repr or log
    max_staleness_seconds: float = 5.0
    pool_size: int = 10

    @property
    def shared(self) -> bool:
        return bool(self.url)


OAUTH_MODES = ("off", "pass-through", "validate")


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    """Interactive users beside API keys (docs/reference/config.md, [oauth]): ``off`` accepts only
    keys; ``pass-through`` forwards other Bearer tokens to the upstream untouched; ``validate``
    verifies JWT access tokens (RFC 9068) here, as the OAuth resource server."""

    mode: str = "off"
    resource: str = ""              # RFC 9728 "resource": this MCP endpoint's public URL
    issuer: str = ""                # the authorization server's issuer (RFC 8414 2)
    jwks_uri: str = ""              # empty: from the issuer's metadata
    audience: str = ""              # the required "aud"; empty: the resource
    roles_claim: str = "roles"

    @property
    def required_audience(self) -> str:
        return self.audience or self.resource


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Where per-key rate limits are counted (docs/reference/limits.md): empty ``redis_url`` is
    in this process (each replica counts alone); a Redis URL is shared by every replica."""

    redis_url: str = field(default="", repr=False)  # may carry a password: never in a repr or log
    # Redis unreachable or slow: "open" lets requests through uncounted, "closed" refuses them (503).
    redis_failure: str = "open"
    redis_timeout_seconds: float = 0.25

    @property
    def shared(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """How long audit events are kept (docs/operations.md, Audit retention)."""

    retention_days: int = 90


@dataclass(frozen=True, slots=True)
class WorkspacesSettings:
    """Many workspaces behind one deployment (docs/reference/config.md, [workspaces]): a public
    request's workspace is read from its host, matched against ``from_host``."""

    from_host: str                              # lower-case, "{workspace}" in exactly one label
    allowed: frozenset[str] = frozenset()       # empty: any workspace name


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    description: str
    permissions: frozenset[str]
    # fnmatch patterns of the MCP tools a key with this role may see and call; None: every tool
    # (docs/reference/config.md, [roles.NAME]).
    tools: tuple[str, ...] | None = None
    # Requests a key with this role may make (docs/reference/limits.md); None: unlimited.
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    workspace: str = "acme"
    data_dir: Path = Path("./data")
    log_level: str = "info"
    shutdown_grace_seconds: float = 20.0
    proxy: ProxySettings = ProxySettings()
    auth: AuthSettings = AuthSettings()
    argon2: Argon2Settings = Argon2Settings()
    admin: AdminSettings = AdminSettings()
    signing: SigningSettings = SigningSettings()
    store: StoreSettings = StoreSettings()
    audit: AuditSettings = AuditSettings()
    oauth: OAuthSettings = OAuthSettings()
    limits: LimitsSettings = LimitsSettings()
    roles: Mapping[str, Role] = field(default_factory=dict)
    # None: single-workspace mode, every request is ``workspace``'s. Set: ``workspace`` is "".
    workspaces: WorkspacesSettings | None = None

    @property
    def multi_workspace(self) -> bool:
        return self.workspaces is not None

    @property
    def database_path(self) -> Path:
        return self.data_dir / "sidecar.db"

    @property
    def tool_policy_configured(self) -> bool:
        """Whether any role restricts tools; if none does, every key may call every tool."""
        return any(role.tools is not None for role in self.roles.values())

    def tool_patterns_for(self, roles: tuple[str, ...] | list[str]) -> tuple[str, ...] | None:
        """The union of the roles' tool patterns; None when one of them allows every tool
        (docs/reference/config.md, [roles.NAME]). Unknown roles grant nothing."""
        if not self.tool_policy_configured:
            return None
        patterns: set[str] = set()
        for name in roles:
            role = self.roles.get(name)
            if role is None:
                continue
            if role.tools is None:
                return None
            patterns.update(role.tools)
        return tuple(sorted(patterns))

    def rate_limit_for(self, roles: tuple[str, ...] | list[str]) -> RateLimit | None:
        """The most generous of the roles' rate limits; None (unlimited) when one of them has
        none (docs/reference/limits.md). Unknown roles grant nothing, not even a limit."""
        known = [self.roles[name].rate_limit for name in roles if name in self.roles]
        return most_generous(known) if known else None

    def key_rate_limit(self, own: str | None, roles: tuple[str, ...] | list[str]) -> RateLimit | None:
        """A key's rate limit: its own (``"unlimited"``: none) when it has one, else its roles'
        (docs/reference/limits.md)."""
        if own is None:
            return self.rate_limit_for(roles)
        return None if own == UNLIMITED else parse_rate_limit(own)

    def permissions_for(self, roles: tuple[str, ...] | list[str]) -> frozenset[str]:
        """The union of the roles' permissions (docs/reference/keys.md); unknown roles grant nothing."""
        perms: set[str] = set()
        for name in roles:
            role = self.roles.get(name)
            if role is not None:
                perms |= role.permissions
        return frozenset(perms)


# ---------------------------------------------------------------------------------------------
# Loading and validation


class _Section:
    """Reads typed values out of one TOML table, remembering which keys were consumed."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def _get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self._used.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        # bool is an int subclass; refuse True where a number is expected and vice versa.
        if isinstance(value, bool) and kind is not bool:
            raise SettingsError(self.key(name), f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise SettingsError(self.key(name), f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value  # type: ignore[return-value]

    def string(self, name: str, default: str) -> str:
        return self._get(name, str, default)

    def boolean(self, name: str, default: bool) -> bool:
        return self._get(name, bool, default)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._get(name, int, default)
        _check_range(self.key(name), value, minimum, maximum)
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        value = float(self._get(name, (int, float), default))
        _check_range(self.key(name), value, minimum, maximum)
        return value

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name, list, list(default))
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise SettingsError(f"{self.key(name)}[{index}]", "expected a string")
        return tuple(value)

    def table(self, name: str) -> Mapping[str, Any]:
        return self._get(name, dict, {})

    def reject_unknown(self) -> None:
        for name in self._data:
            if name not in self._used:
                raise SettingsError(self.key(name), "unknown setting")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list": "a list", "dict": "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _check_range(key: str, value: float, minimum: float, maximum: float | None) -> None:
    if value < minimum:
        raise SettingsError(key, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(key, f"must be at most {maximum}, got {value}")


def parse_listen(key: str, text: str) -> ListenAddress:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise SettingsError(key, f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise SettingsError(key, f"port out of range in {text!r}")
    return ListenAddress(host, port)


def _parse_upstream(key: str, text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(key, f"expected an http(s) URL, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SettingsError(key, "must not contain a query, fragment or credentials")
    # The request's path is appended (docs/reference/headers.md), so a trailing slash would double it.
    return text.rstrip("/")


def _parse_origin(key: str, text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise SettingsError(key, f"expected an origin like https://app.example.com, got {text!r}")
    # RFC 6454 6.2: the serialized origin is scheme://host[:port], lower-case, no path.
    return f"{parts.scheme}://{parts.netloc}".lower()


def load_settings(path: Path | str | None, environ: Mapping[str, str]) -> Settings:
    """Read and validate the config file at ``path`` (``None``: defaults only)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"not valid TOML: {exc}") from None
        except OSError as exc:
            raise SettingsError("config", f"cannot read {path}: {exc.strerror}") from None
    return settings_from_mapping(data, environ, base_dir=path.parent if path is not None else Path("."))


def settings_from_mapping(data: Mapping[str, Any], environ: Mapping[str, str], *,
                          base_dir: Path = Path(".")) -> Settings:
    """Validate an already-parsed TOML document (used by tests and the demo)."""
    top = _Section(data, "")
    workspaces = _load_workspaces(_Section(top.table("workspaces"), "workspaces.")) if "workspaces" in data else None
    workspace = top.string("workspace", "acme")
    if workspaces is not None:
        # Either one workspace for every request or the request's own, never both: a leftover
        # "workspace" beside [workspaces] would read as a default the sidecar does not apply.
        if "workspace" in data:
            raise SettingsError("workspace", "remove it: with [workspaces] each request's workspace comes "
                                             "from its host (workspaces.from_host)")
        workspace = ""
    elif not _WORKSPACE.fullmatch(workspace):
        raise SettingsError("workspace", "1-64 characters of A-Z a-z 0-9 . _ -")
    data_dir = Path(top.string("data_dir", "./data"))
    if not data_dir.is_absolute():
        data_dir = base_dir / data_dir
    log_level = top.string("log_level", "info").lower()
    if log_level not in LOG_LEVELS:
        raise SettingsError("log_level", f"one of {', '.join(LOG_LEVELS)}")
    grace = top.number("shutdown_grace_seconds", 20.0, minimum=0, maximum=3600)

    proxy = _load_proxy(_Section(top.table("proxy"), "proxy."))
    auth = _load_auth(_Section(top.table("auth"), "auth."))
    argon2 = _load_argon2(_Section(top.table("argon2"), "argon2."))
    admin = _load_admin(_Section(top.table("admin"), "admin."))
    signing = _load_signing(_Section(top.table("signing"), "signing."), environ, base_dir)
    store = _load_store(_Section(top.table("store"), "store."), environ)
    audit = _load_audit(_Section(top.table("audit"), "audit."))
    oauth = _load_oauth(_Section(top.table("oauth"), "oauth."))
    limits = _load_limits(_Section(top.table("limits"), "limits."), environ)
    roles = _load_roles(top.table("roles"))
    top.reject_unknown()

    if workspaces is not None and oauth.mode == "validate":
        # A signed-in user carries no workspace of its own, and the resource (RFC 9728) differs
        # per host: not supported together yet (docs/reference/config.md, [workspaces]).
        raise SettingsError("oauth.mode", "\"validate\" cannot be combined with [workspaces]; "
                                          "use \"off\" or \"pass-through\"")
    if _clash(proxy.listen, admin.listen):
        raise SettingsError("admin.listen", "must differ from proxy.listen (admin is never on the public port)")
    return Settings(workspace=workspace, data_dir=data_dir, log_level=log_level,
                    shutdown_grace_seconds=grace, proxy=proxy, auth=auth, argon2=argon2,
                    admin=admin, signing=signing, store=store, audit=audit, oauth=oauth, limits=limits, roles=roles,
                    workspaces=workspaces)


def _clash(a: ListenAddress, b: ListenAddress) -> bool:
    """Would both listeners bind the same port? A wildcard host overlaps every address."""
    if a.port != b.port or a.port == 0:
        return False
    wildcard = ("0.0.0.0", "::", "")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


def host_workspace_name(name: str) -> bool:
    """Can ``name`` be the workspace of a host (``{workspace}`` in ``workspaces.from_host``)? Host
    names are matched lower-cased and a DNS label holds no dot (RFC 1123 2.1), so such a name is
    one lower-case label: 1-63 letters, digits and hyphens, no hyphen first or last."""
    return _DNS_LABEL.fullmatch(name) is not None


def check_host_template(template: str) -> str:
    """The ``workspaces.from_host`` template, lower-cased, or a ValueError saying what is wrong:
    a host name (no port, no trailing dot, no wildcard) whose one label holds ``{workspace}``,
    with at least one label after it."""
    text = template.lower()
    if text.count(WORKSPACE_PLACEHOLDER) != 1:
        raise ValueError(f"must contain {WORKSPACE_PLACEHOLDER} exactly once, e.g. \"{{workspace}}.toolio.com\"")
    labels = text.split(".")
    for index, label in enumerate(labels):
        if WORKSPACE_PLACEHOLDER in label:
            prefix, _, suffix = label.partition(WORKSPACE_PLACEHOLDER)
            if not _LABEL_PART.fullmatch(prefix) or not _LABEL_PART.fullmatch(suffix):
                raise ValueError(f"the label around {WORKSPACE_PLACEHOLDER} may hold only a-z 0-9 and -")
            if index == len(labels) - 1:
                raise ValueError(f"{WORKSPACE_PLACEHOLDER} needs a domain after it, e.g. \"{{workspace}}.toolio.com\"")
        elif not _DNS_LABEL.fullmatch(label):
            raise ValueError(f"{label!r} is not a host name label (a-z 0-9 -; no port, no trailing dot, no *)")
    return text


def _load_workspaces(s: _Section) -> WorkspacesSettings:
    template = s.string("from_host", "")
    if not template:
        raise SettingsError(s.key("from_host"), "required with [workspaces], e.g. \"{workspace}.toolio.com\"")
    try:
        template = check_host_template(template)
    except ValueError as exc:
        raise SettingsError(s.key("from_host"), str(exc)) from None
    allowed = s.strings("allowed")
    for index, name in enumerate(allowed):
        if not host_workspace_name(name):
            raise SettingsError(f"{s.key('allowed')}[{index}]",
                                f"{name!r} is not a workspace name a host can carry: 1-63 lower-case "
                                "letters, digits and hyphens, not starting or ending with a hyphen")
    result = WorkspacesSettings(from_host=template, allowed=frozenset(allowed))
    s.reject_unknown()
    return result


def _load_proxy(s: _Section) -> ProxySettings:
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for index, cidr in enumerate(s.strings("trusted_proxies")):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise SettingsError(f"proxy.trusted_proxies[{index}]", f"not a CIDR: {cidr!r}") from None
    origins = frozenset(_parse_origin(f"proxy.allowed_origins[{i}]", o)
                        for i, o in enumerate(s.strings("allowed_origins")))
    result = ProxySettings(
        listen=parse_listen(s.key("listen"), s.string("listen", "0.0.0.0:8080")),
        upstream=_parse_upstream(s.key("upstream"), s.string("upstream", "http://127.0.0.1:8000")),
        trusted_proxies=tuple(networks),
        allowed_origins=origins,
        max_body_bytes=s.integer("max_body_bytes", 10 * 1024 * 1024, minimum=0),
        upstream_timeout_seconds=s.number("upstream_timeout_seconds", 30.0, minimum=0.001),
        header_timeout_seconds=s.number("header_timeout_seconds", 5.0, minimum=0.1, maximum=300),
        keepalive_timeout_seconds=s.number("keepalive_timeout_seconds", 75.0, minimum=0, maximum=3600),
        upstream_max_connections=s.integer("upstream_max_connections", 2048, minimum=1),
        upstream_pool_timeout_seconds=s.number("upstream_pool_timeout_seconds", 5.0, minimum=0.001),
        session_binding_max=s.integer("session_binding_max", 100_000, minimum=1),
        session_binding_ttl_seconds=s.number("session_binding_ttl_seconds", 86_400.0, minimum=1),
        max_concurrent_requests_per_key=s.integer("max_concurrent_requests_per_key", 64, minimum=0),
    )
    s.reject_unknown()
    return result


def _load_auth(s: _Section) -> AuthSettings:
    result = AuthSettings(
        cache_size=s.integer("cache_size", 10_000, minimum=1),
        negative_cache_size=s.integer("negative_cache_size", 10_000, minimum=1),
        negative_cache_ttl_seconds=s.number("negative_cache_ttl_seconds", 60.0, minimum=0),
        max_concurrent_verifications=s.integer("max_concurrent_verifications", 2, minimum=1, maximum=64),
        failures_per_minute_per_address=s.integer("failures_per_minute_per_address", 30, minimum=1),
        max_queued_verifications=s.integer("max_queued_verifications", 1024, minimum=1, maximum=1_000_000),
        failures_per_minute_per_lookup_id=s.integer("failures_per_minute_per_lookup_id", 10, minimum=1),
        failures_per_minute_per_lookup_id_total=s.integer("failures_per_minute_per_lookup_id_total", 100, minimum=1),
        last_used_flush_seconds=s.number("last_used_flush_seconds", 5.0, minimum=0.05, maximum=3600),
        store_poll_seconds=s.number("store_poll_seconds", 0.25, minimum=0.01, maximum=1.0),
    )
    s.reject_unknown()
    return result


def _load_argon2(s: _Section) -> Argon2Settings:
    result = Argon2Settings(
        time_cost=s.integer("time_cost", 2, minimum=1, maximum=100),
        # RFC 9106 4: memory must be at least 8 * parallelism KiB.
        memory_cost_kib=s.integer("memory_cost_kib", 19_456, minimum=8, maximum=4 * 1024 * 1024),
        parallelism=s.integer("parallelism", 1, minimum=1, maximum=64),
    )
    if result.memory_cost_kib < 8 * result.parallelism:
        raise SettingsError("argon2.memory_cost_kib", "must be at least 8 * argon2.parallelism")
    s.reject_unknown()
    return result


def _load_admin(s: _Section) -> AdminSettings:
    permission = s.string("required_permission", "org:settings")
    if not _PERMISSION.fullmatch(permission):
        raise SettingsError("admin.required_permission", f"not a permission name: {permission!r}")
    idle = s.number("session_idle_timeout_seconds", 1800.0, minimum=1)
    absolute = s.number("session_absolute_timeout_seconds", 43_200.0, minimum=1)
    result = AdminSettings(
        listen=parse_listen(s.key("listen"), s.string("listen", "127.0.0.1:9090")),
        required_permission=permission,
        session_idle_timeout_seconds=idle,
        session_absolute_timeout_seconds=absolute,
        secure_cookies=s.boolean("secure_cookies", False),
    )
    s.reject_unknown()
    return result


def _load_signing(s: _Section, environ: Mapping[str, str], base_dir: Path) -> SigningSettings:
    algorithm = s.string("algorithm", "ES256")
    if algorithm not in ALGORITHMS:
        raise SettingsError("signing.algorithm", f"one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    files = tuple(Path(p) if Path(p).is_absolute() else base_dir / p
                  for p in s.strings("private_key_files"))
    for index, file in enumerate(files):
        if not file.is_file():
            raise SettingsError(f"signing.private_key_files[{index}]", f"no such file: {file}")
    issuer = s.string("issuer", "toolio-sidecar")
    audience = s.string("audience", "toolio-mcp")
    if not issuer:
        raise SettingsError("signing.issuer", "must not be empty")
    if not audience:
        raise SettingsError("signing.audience", "must not be empty")
    env_keys = environ.get(SIGNING_KEYS_ENV) or None
    result = SigningSettings(
        algorithm=algorithm,
        private_key_files=files,
        issuer=issuer,
        audience=audience,
        lifetime_seconds=s.integer("lifetime_seconds", 60, minimum=1, maximum=3600),
        env_keys=env_keys,
    )
    s.reject_unknown()
    return result


def _load_store(s: _Section, environ: Mapping[str, str]) -> StoreSettings:
    configured = s.string("url", "")  # read either way: an empty url beside the variable is fine
    url = environ.get(STORE_URL_ENV) or configured
    key = STORE_URL_ENV if environ.get(STORE_URL_ENV) else s.key("url")
    if url:
        parts = urlsplit(url)
        # The message never repeats the URL: it may carry a password.
        if parts.scheme not in ("postgresql", "postgres"):
            raise SettingsError(key, "expected a postgresql:// URL (or empty for SQLite in data_dir)")
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise SettingsError(key, "the URL's port is not a number") from None
        if not parts.hostname and "host=" not in parts.query:
            raise SettingsError(key, "the URL names no host")
    result = StoreSettings(
        url=url,
        max_staleness_seconds=s.number("max_staleness_seconds", 5.0, minimum=0.5, maximum=3600),
        pool_size=s.integer("pool_size", 10, minimum=1, maximum=1000),
    )
    s.reject_unknown()
    return result


def _load_audit(s: _Section) -> AuditSettings:
    # At least one day: the database refuses to delete an audit row younger than that
    # (docs/operations.md, Audit retention).
    result = AuditSettings(retention_days=s.integer("retention_days", 90, minimum=1, maximum=36_500))
    s.reject_unknown()
    return result


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _oauth_url(key: str, text: str, *, what: str) -> str:
    """An https URL (plain http only on loopback, for local tests), without fragment or
    credentials: RFC 9728 2 (resource), RFC 8414 2 (issuer), RFC 7517 (a JWKS fetched over TLS)."""
    if not text.isascii() or not text.isprintable() or any(c in text for c in ' "\\<>'):
        # It is quoted in WWW-Authenticate (RFC 9110 11.2) and served in JSON metadata: plain URL
        # characters only (RFC 3986 2).
        raise SettingsError(key, "a URL of printable ASCII without spaces, quotes or backslashes")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(key, f"expected {what} as an https:// URL, got {text!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise SettingsError(key, "must be an https:// URL (plain http only for a loopback host)")
    if parts.fragment or "#" in text or parts.username or parts.password:
        raise SettingsError(key, "must not contain a fragment or credentials")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise SettingsError(key, "the URL's port is not a number") from None
    return text


def _load_oauth(s: _Section) -> OAuthSettings:
    mode = s.string("mode", "off")
    if mode not in OAUTH_MODES:
        raise SettingsError(s.key("mode"), f"one of {', '.join(OAUTH_MODES)}, got {mode!r}")
    resource = s.string("resource", "")
    issuer = s.string("issuer", "")
    jwks_uri = s.string("jwks_uri", "")
    audience = s.string("audience", "")
    roles_claim = s.string("roles_claim", "roles")
    if resource:
        _oauth_url(s.key("resource"), resource, what="this MCP endpoint's public URL")
    if issuer:
        _oauth_url(s.key("issuer"), issuer, what="the authorization server's issuer")
        if urlsplit(issuer).query:
            raise SettingsError(s.key("issuer"), "an issuer has no query component (RFC 8414 2)")
    if jwks_uri:
        _oauth_url(s.key("jwks_uri"), jwks_uri, what="the authorization server's JWKS")
    if not roles_claim or not roles_claim.isprintable():
        raise SettingsError(s.key("roles_claim"), "must name a claim")
    if mode == "validate":
        if not resource:
            raise SettingsError(s.key("resource"), "required when oauth.mode is \"validate\"")
        if not issuer:
            raise SettingsError(s.key("issuer"), "required when oauth.mode is \"validate\"")
    result = OAuthSettings(mode=mode, resource=resource, issuer=issuer, jwks_uri=jwks_uri, audience=audience,
                           roles_claim=roles_claim)
    s.reject_unknown()
    return result


def _load_limits(s: _Section, environ: Mapping[str, str]) -> LimitsSettings:
    configured = s.string("redis_url", "")
    url = environ.get(REDIS_URL_ENV) or configured
    key = REDIS_URL_ENV if environ.get(REDIS_URL_ENV) else s.key("redis_url")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            # Never echo the URL: it may carry a password.
            raise SettingsError(key, "expected redis://[:password@]host[:port][/db], rediss://... or unix://path")
        from redis.asyncio.connection import parse_url  # the client's own reading, as Quota will use it

        try:
            parse_url(url)  # a port or a ?option it cannot read (its messages never repeat the URL)
        except ValueError as exc:
            raise SettingsError(key, str(exc)) from None
    failure = s.string("redis_failure", "open")
    if failure not in REDIS_FAILURE_MODES:
        raise SettingsError(s.key("redis_failure"), "one of open, closed")
    result = LimitsSettings(redis_url=url, redis_failure=failure,
                            redis_timeout_seconds=s.number("redis_timeout_seconds", 0.25, minimum=0.001, maximum=30))
    s.reject_unknown()
    return result


DEFAULT_ROLES: Mapping[str, Role] = {
    "viewer": Role("viewer", "Read planning data", frozenset({"plans:read"})),
    "org-admin": Role("org-admin", "Access organization settings, including API keys",
                      frozenset({"org:settings"})),
}


def _load_roles(table: Mapping[str, Any]) -> Mapping[str, Role]:
    if not table:
        return dict(DEFAULT_ROLES)
    roles: dict[str, Role] = {}
    for name, body in table.items():
        key = f"roles.{name}"
        if not _ROLE_NAME.fullmatch(name):
            raise SettingsError(key, "role names are 1-64 characters of A-Z a-z 0-9 . _ -")
        if not isinstance(body, dict):
            raise SettingsError(key, "expected a table with description and permissions")
        section = _Section(body, key + ".")
        description = section.string("description", "")
        permissions = section.strings("permissions")
        for index, perm in enumerate(permissions):
            if not _PERMISSION.fullmatch(perm):
                raise SettingsError(f"{key}.permissions[{index}]", f"not a permission name: {perm!r}")
        tools: tuple[str, ...] | None = None
        if "tools" in body:
            tools = section.strings("tools")
            for index, pattern in enumerate(tools):
                if not _TOOL_PATTERN.fullmatch(pattern):
                    raise SettingsError(f"{key}.tools[{index}]",
                                        f"a tool pattern is 1-128 visible ASCII characters, got {pattern!r}")
        rate_limit: RateLimit | None = None
        if "rate_limit" in body:
            try:
                rate_limit = parse_rate_limit(section.string("rate_limit", ""))
            except ValueError as exc:
                raise SettingsError(f"{key}.rate_limit", str(exc)) from None
        section.reject_unknown()
        roles[name] = Role(name, description, frozenset(permissions), tools, rate_limit)
    return roles
