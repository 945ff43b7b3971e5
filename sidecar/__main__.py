"""The ``toolio-sidecar`` command line (docs/reference/config.md): parse args, load settings, run.

    toolio-sidecar serve [--config PATH]
    toolio-sidecar keys create --name NAME --role ROLE [--role ROLE ...] [--expires-at T] [--rate-limit L] [--json]
    toolio-sidecar keys list [--search TEXT] [--status S] [--role ROLE] [--sort SORT] [--json]
    toolio-sidecar keys show|disable|enable KEY [--json]          (KEY: an id or a name)
    toolio-sidecar keys rotate KEY --name NEW [--disable-old-at T] [--json]
    toolio-sidecar keys update KEY --rate-limit N/second|N/minute|N/hour|unlimited|roles [--json]
    toolio-sidecar keys generate [--json]
    toolio-sidecar keys import --name NAME --role ROLE [--role ROLE ...] [--rate-limit L] [--json]
                                                       (value on stdin or in an env var)
    toolio-sidecar audit list [--key KEY] [--action ACTION] [--limit N] [--before ID] [--json]
    (with [workspaces]: --workspace NAME on keys create|list|show|disable|enable|rotate|update and audit list)
    toolio-sidecar demo
    toolio-sidecar completion bash|zsh
    toolio-sidecar --version

Exit status: 0 ok, 1 operation failed (e.g. unknown id), 2 bad usage or bad config, 141 when
the reader of stdout went away (``| head``), as for a command ended by SIGPIPE. Every refusal
is one line on stderr (``--json``: one JSON object), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.completion import bash_script
from sidecar.keys.audit import AuditLog
from sidecar.keys.errors import InvalidInput, KeyDomainError
from sidecar.keys.format import KeyHasher, generate_key, preview
from sidecar.keys.importer import IMPORT_KEY_ENV, import_key
from sidecar.keys.listing import MAX_LIMIT, key_query
from sidecar.keys.manager import KeyManager, key_json
from sidecar.keys.records import DISABLED, ENABLED, AuditRecord
from sidecar.keys.store import store_for
from sidecar.keys.store.base import KeyStore, StoreError
from sidecar.keys.store.copy import copy_store
from sidecar.logs import JsonLog
from sidecar.metrics import Metrics
from sidecar.proxy.assertion import (
    STORED_KEYS,
    STORED_KEYS_PUBLISH_SECONDS,
    STORED_KEYS_REFRESH_SECONDS,
    configured_keys,
    rotated_key_set,
    signing_keys,
    stored_key_set,
)
from sidecar.settings import CONFIG_ENV, Settings, SettingsError, host_workspace_name, load_settings

# A key is named by its id ("key_" + base62, sidecar.keys.new_key_id) or its name (1-64 of
# A-Z a-z 0-9 . _ -). Anything outside both is a usage error (status 2) rather than an unknown
# key (status 1), and never reaches the store: SQLite cannot even bind a string holding the lone
# surrogates that undecodable argv bytes become (PEP 383).
_KEY_ID_ARG = re.compile(r"[A-Za-z0-9._-]{1,128}")
_PORT_ARG = re.compile(r"[0-9]{1,5}")
_ACTION_ARG = re.compile(r"[a-z0-9_.-]{1,64}")
# `keys update --rate-limit roles`: the key's own limit goes, its roles' applies again (the admin
# API's null, docs/reference/cli.md).
ROLES_LIMIT = "roles"
RATE_LIMIT_HELP = "N/second, N/minute or N/hour (e.g. 600/minute), or unlimited"
# Exit status when stdout's reader has gone: what a shell reports for a command SIGPIPE ended.
BROKEN_PIPE = 141
AUDIT_PAGE = 500
CREATE_CONFIG_HINT = ("create one with: cp config.example.toml config.toml "
                      f"(or pass --config PATH, or set {CONFIG_ENV})")


def _one_line(text: str) -> str:
    """``text`` with line breaks, other control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (status 2, as argparse's own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _count(text: str) -> int:
    # ASCII digits only: int() would also take "١٢".
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number from 1: {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not _PORT_ARG.fullmatch(text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (0-65535): {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toolio-sidecar", description="API-key auth sidecar for Toolio's MCP server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="PATH",
                       help=f"config file (default: ${CONFIG_ENV}, else ./config.toml)")
        return p

    with_config(commands.add_parser("serve", help="run the proxy and admin listeners"))
    demo = with_config(commands.add_parser("demo", help="example MCP server + sidecar + keys, ready to try"))
    demo.add_argument("--port", type=_port, default=8080, help="public port (admin is port + 1010)")
    demo.add_argument("--once", action="store_true", help="set up, self-check, print, and exit")

    keys = commands.add_parser("keys", help="manage API keys directly in the store").add_subparsers(
        dest="keys_command", required=True)
    create = with_config(keys.add_parser("create", help="create a key; prints the full key once"))
    create.add_argument("--name", required=True)
    create.add_argument("--role", action="append", required=True, dest="roles")
    create.add_argument("--expires-at", help="RFC 3339 time after which the key stops working")
    create.add_argument("--rate-limit", metavar="LIMIT",
                        help=f"the key's own rate limit: {RATE_LIMIT_HELP} (default: {ROLES_LIMIT}, its roles')")
    listing = with_config(keys.add_parser("list", help="list keys (every page of them)"))
    listing.add_argument("--search", metavar="TEXT", help="only keys whose name contains TEXT (any case)")
    listing.add_argument("--status", metavar="STATUS", help="only enabled or disabled keys")
    listing.add_argument("--role", metavar="ROLE", help="only keys with this role")
    listing.add_argument("--sort", metavar="SORT", default="created",
                         help="name, created (default) or last_used; a leading - reverses (write --sort=-name)")
    for verb in ("show", "disable", "enable"):
        with_config(keys.add_parser(verb, help=f"{verb} a key")).add_argument(
            "id", metavar="KEY", help="the key's id (key_...) or name")
    rotate = with_config(keys.add_parser("rotate", help="new key with the same roles"))
    rotate.add_argument("id", metavar="KEY", help="the key's id (key_...) or name")
    rotate.add_argument("--name", required=True)
    rotate.add_argument("--disable-old-at", help="RFC 3339 time to disable the old key")
    update = with_config(keys.add_parser("update", help="change a key's own rate limit"))
    update.add_argument("id", metavar="KEY", help="the key's id (key_...) or name")
    update.add_argument("--rate-limit", metavar="LIMIT", required=True,
                        help=f"{RATE_LIMIT_HELP}, or {ROLES_LIMIT} (back to its roles' limit)")
    _add_bootstrap_commands(keys, with_config)
    for verb in ("create", "list", "show", "disable", "enable", "rotate", "update", "import"):
        keys.choices[verb].add_argument(
            "--workspace", metavar="NAME",
            help="the key's workspace (with [workspaces]: required by create and import; "
                 "list without it shows every one)")
    for sub in keys.choices.values():
        sub.add_argument("--json", action="store_true", help="machine-readable output")

    audit = commands.add_parser("audit", help="read the audit log in the store").add_subparsers(
        dest="audit_command", required=True)
    audit_list = with_config(audit.add_parser("list", help="audit events, newest first"))
    audit_list.add_argument("--key", metavar="KEY", help="only events about this key (id or name)")
    audit_list.add_argument("--action", metavar="ACTION", help="only events of this action, e.g. key.disabled")
    audit_list.add_argument("--limit", metavar="N", type=_count, default=50, help="how many events (default 50)")
    audit_list.add_argument("--before", metavar="ID", type=_count, help="only events older than this event id")
    audit_list.add_argument("--workspace", metavar="NAME",
                            help="the workspace whose events to read (required with [workspaces])")
    audit_list.add_argument("--json", action="store_true", help="machine-readable output")
    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"],
                            help='e.g. source <(toolio-sidecar completion bash) in ~/.bashrc')
    with_config(commands.add_parser(
        "migrate", help="apply the store's schema migrations (e.g. from a Helm hook Job); serve does it too"))
    store = commands.add_parser("store", help="move keys between stores").add_subparsers(
        dest="store_command", required=True)
    copy = store.add_parser("copy", help="copy keys and the audit log from one store into another (idempotent)")
    copy.add_argument("--from-config", required=True, metavar="PATH", help="config of the store to copy from")
    copy.add_argument("--to-config", required=True, metavar="PATH", help="config of the store to copy into")
    signing = commands.add_parser("signing", help="signing keys kept in a shared store").add_subparsers(
        dest="signing_command", required=True)
    with_config(signing.add_parser(
        "rotate", help="add a new signing key: published by every replica at once, used for signing later"))
    for sub in (*store.choices.values(), *signing.choices.values(), commands.choices["migrate"]):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


class MissingConfig(SettingsError):
    """No file at the config path: the one refusal that says how to make one."""

    def __init__(self, path: str) -> None:
        super().__init__("config", f"no config file at {path}")
        self.path = path


def _load(path: str) -> Settings:
    if not Path(path).exists():
        raise MissingConfig(path)
    try:
        return load_settings(path, os.environ)
    except UnicodeDecodeError:  # tomllib reads UTF-8 only and says so with this, not TOMLDecodeError
        raise SettingsError("config", f"{path} is not UTF-8 text") from None


def _settings(args: argparse.Namespace) -> Settings:
    return _load(args.config or os.environ.get(CONFIG_ENV) or "config.toml")


def _config_refusal(exc: SettingsError) -> int:
    """Say what is wrong with the config in one line on stderr; exit status 2."""
    text = str(exc)
    if exc.key == "config":
        # About the file itself, not a key in it: "config: config: ..." would say it twice.
        text = "config file: " + text.removeprefix("config: config: ")
    if isinstance(exc, MissingConfig):
        text = f"no config file at {exc.path}; {CREATE_CONFIG_HINT}"
    print(f"toolio-sidecar: {_one_line(text)}", file=sys.stderr)
    return 2


async def _opened(settings: Settings) -> KeyStore:
    store = store_for(settings)
    try:
        await store.open()
    except (OSError, sqlite3.Error, StoreError) as exc:
        if store.shared:
            # The message names the server, never the URL's password (the store redacts it).
            raise SettingsError(_STORE_URL_KEY, str(exc)) from None
        # data_dir is a file, not writable, or holds something that is not this store.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError("data_dir", f"cannot open the store {settings.database_path}: {reason}") from None
    return store


async def _with_manager(settings: Settings,
                        action: Callable[[KeyManager, KeyStore], Awaitable[int]]) -> int:
    store = await _opened(settings)
    try:
        # Audit rows go to the store; the CLI's stdout is for the command's own output.
        log = JsonLog(stream=sys.stderr, level="warning")
        audit = AuditLog(store, log, Metrics(CollectorRegistry()), settings.workspace)
        return await action(KeyManager(settings, store, KeyHasher(settings.argon2), audit), store)
    finally:
        await store.close()


def _print_key(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for field in ("id", "name", "workspace", "preview", "roles", "permissions", "status", "created_at", "created_by",
                  "last_used_at", "disabled_at", "expires_at", "disable_at"):
        value = data.get(field)
        print(f"{field:>13}: {', '.join(value) if isinstance(value, list) else value if value else '-'}")
    print(f"{'rate_limit':>13}: {_rate_limit_text(data)}")


def _own_limit(option: str | None) -> str | None:
    """``--rate-limit``'s value as the key manager takes it: ``roles`` (or no option) is None."""
    return None if option is None or option == ROLES_LIMIT else option


def _rate_limit_text(data: dict[str, Any]) -> str:
    """``600/minute (roles)`` or ``100/second (own)``: what holds the key and where it comes from."""
    source = "own" if data["rate_limit_source"] == "key" else "roles"
    return f"{data['effective_rate_limit']} ({source})"


def _refuse(exc: KeyDomainError, as_json: bool) -> int:
    message = {"error": exc.code, "message": exc.message, "field": exc.field, **exc.extra}
    print(json.dumps(message) if as_json else f"error: {_one_line(exc.message)}", file=sys.stderr)
    return 2 if isinstance(exc, InvalidInput) else 1


def _workspace_problem(workspace: str, settings: Settings) -> str | None:
    """Why ``--workspace`` cannot be used with these settings, or None."""
    if settings.multi_workspace:
        if not host_workspace_name(workspace):
            return (f"--workspace {workspace!r}: a workspace served from its host is 1-63 lower-case letters, "
                    "digits and hyphens, not starting or ending with a hyphen")
        allowed = settings.workspaces.allowed if settings.workspaces is not None else frozenset()
        if allowed and workspace not in allowed:
            return f"--workspace {workspace!r} is not in workspaces.allowed"
        return None
    if workspace != settings.workspace:
        return f"--workspace {workspace!r}: this config serves only workspace {settings.workspace!r}"
    return None


def _key_ref(args: argparse.Namespace, attribute: str) -> str | None:
    """The key named on the command line (an id or a name), or the usage refusal."""
    ref: object = getattr(args, attribute, None)
    if ref is None:
        return None
    if not isinstance(ref, str) or not _KEY_ID_ARG.fullmatch(ref):
        raise InvalidInput("invalid_id", "a key is named by its id (key_...) or its name (letters, digits, "
                                         f". _ -), not {ref!r}", attribute)
    return ref


def _list_line(key: dict[str, Any]) -> str:
    return (f"{key['id']:<21} {key['name']:<24} {key['preview']:<12} {key['status']:<9} "
            f"{','.join(key['roles']):<24} {_rate_limit_text(key):<26} {key['last_used_at'] or '-'}")


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    as_json: bool = args.json

    workspace: str | None = getattr(args, "workspace", None)
    if workspace is not None:
        problem = _workspace_problem(workspace, settings)
        if problem is not None:
            return _refuse(InvalidInput("invalid_workspace", problem, "workspace"), as_json)
    try:
        ref = _key_ref(args, "id")  # refused before the store is opened
    except KeyDomainError as exc:
        return _refuse(exc, as_json)

    async def run(manager: KeyManager, store: KeyStore) -> int:
        verb = args.keys_command
        if verb == "create":
            record, full = await manager.create(name=args.name, roles=args.roles, actor="cli",
                                                client=None, expires_at=args.expires_at,
                                                rate_limit=_own_limit(args.rate_limit), workspace=workspace)
        elif verb == "rotate":
            assert ref is not None
            old = await manager.find(ref, workspace)
            record, full, _ = await manager.rotate(old.id, name=args.name, actor="cli", client=None,
                                                   disable_old_at=args.disable_old_at, workspace=old.workspace)
        if verb in ("create", "rotate"):
            data = {**key_json(record, settings), "key": full}
            if as_json:
                print(json.dumps(data, indent=2))
            else:
                print(f"key: {full}\nThis is the only time the full key is shown; store it now.\n")
                _print_key(data, False)
            return 0
        if verb == "list":
            # Without --workspace: the configured one, or with [workspaces] every one (None).
            scope = workspace if workspace is not None or settings.multi_workspace else settings.workspace
            query = key_query(scope, settings.roles, search=args.search, status=args.status,
                              role=args.role, sort=args.sort, limit=MAX_LIMIT)
            if as_json:
                keys = [key_json(r, settings) async for page in manager.pages(query) for r in page]
                print(json.dumps({"keys": keys}, indent=2))
                return 0
            # With [workspaces] one list may span workspaces: say whose each key is.
            ws = settings.multi_workspace
            print(("WORKSPACE            " if ws else "")
                  + f"{'ID':<21} {'NAME':<24} {'KEY':<12} {'STATUS':<9} {'ROLES':<24} {'RATE LIMIT':<26} "
                  "LAST USED")
            # A page at a time: the first lines come at once however many keys there are.
            async for page in manager.pages(query):
                for record in page:
                    key = key_json(record, settings)
                    print((f"{key['workspace']:<20} " if ws else "") + _list_line(key))
            return 0
        assert ref is not None
        record = await manager.find(ref, workspace)
        if verb == "update":
            record = await manager.set_rate_limit(record.id, _own_limit(args.rate_limit), actor="cli", client=None,
                                                  workspace=record.workspace)
        elif verb != "show":
            record = await manager.set_status(record.id, DISABLED if verb == "disable" else ENABLED,
                                              actor="cli", client=None, workspace=record.workspace)
        _print_key(key_json(record, settings), as_json)
        return 0

    try:
        return asyncio.run(_with_manager(settings, run))
    except KeyDomainError as exc:
        return _refuse(exc, as_json)
    except SettingsError as exc:
        return _config_refusal(exc)


def _print_events(events: list[AuditRecord], next_before: int | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"events": [e.as_json() for e in events], "next_before": next_before}, indent=2))
        return
    print(f"{'ID':<7} {'TIME':<25} {'ACTION':<20} {'ACTOR':<16} {'KEY':<24} CLIENT")
    for event in events:
        data = event.as_json()
        print(f"{data['id']:<7} {data['time']:<25} {data['action']:<20} {data['actor']:<16} "
              f"{data['key_name'] or '-':<24} {data['client'] or '-'}")
    if next_before is not None:
        print(f"(older events: --before {next_before})")


def _audit(args: argparse.Namespace, settings: Settings) -> int:
    as_json: bool = args.json

    try:  # refused before the store is opened
        if args.action is not None and not _ACTION_ARG.fullmatch(args.action):
            raise InvalidInput("invalid_parameter", f"action must look like key.disabled, not {args.action!r}",
                               "action")
        ref = _key_ref(args, "key")
        workspace: str | None = args.workspace
        if workspace is not None:
            problem = _workspace_problem(workspace, settings)
            if problem is not None:
                raise InvalidInput("invalid_workspace", problem, "workspace")
        elif settings.multi_workspace:
            # The audit log is read one workspace at a time (as the admin API's is).
            raise InvalidInput("missing_workspace", "--workspace is required with [workspaces]", "workspace")
        else:
            workspace = settings.workspace
    except KeyDomainError as exc:
        return _refuse(exc, as_json)

    async def run(manager: KeyManager, store: KeyStore) -> int:
        key_id = (await manager.find(ref, workspace)).id if ref is not None else None
        events: list[AuditRecord] = []
        before: int | None = args.before
        # Newest first, in store pages, until --limit events or the log's start.
        while len(events) < args.limit:
            want = min(AUDIT_PAGE, args.limit - len(events))
            page = await store.list_audit(workspace, want, before, action=args.action, key_id=key_id)
            events.extend(page)
            if len(page) < want:
                break
            before = page[-1].id
        # Exactly --limit found: there may be older ones, from --before the last id.
        next_before = events[-1].id if events and len(events) == args.limit else None
        _print_events(events, next_before, as_json)
        return 0

    try:
        return asyncio.run(_with_manager(settings, run))
    except KeyDomainError as exc:
        return _refuse(exc, as_json)
    except SettingsError as exc:
        return _config_refusal(exc)


_STORE_URL_KEY = "store.url"


def _run_fast(work: Coroutine[Any, Any, None]) -> None:
    """Serve on uvloop when it is installed (the ``fast`` extra; the container image has it):
    the listener's per-request cost is mostly event-loop work, which uvloop does in C. Plain
    asyncio otherwise; behaviour is the same."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(work)
    else:
        uvloop.run(work)


def _run_one_line(work: Coroutine[Any, Any, int]) -> int:
    """Run a store command; its failures are one line on stderr (config: 2, store: 1)."""
    try:
        return asyncio.run(work)
    except SettingsError as exc:
        return _config_refusal(exc)
    except StoreError as exc:
        print(f"toolio-sidecar: {_one_line(str(exc))}", file=sys.stderr)
        return 1


async def _migrate(settings: Settings, as_json: bool) -> int:
    store = store_for(settings)
    try:
        applied = await store.migrate()
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot migrate {store.description}: {exc}") from None
    print(json.dumps({"applied": applied}) if as_json else f"{store.description}: {applied} migration(s) applied")
    return 0


async def _copy(from_path: str, to_path: str, as_json: bool) -> int:
    source_settings, target_settings = _load(from_path), _load(to_path)
    source = await _opened(source_settings)
    try:
        target = await _opened(target_settings)
        try:
            if source.description == target.description:
                raise SettingsError("--to-config", "names the same store as --from-config")
            report = await copy_store(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
    if as_json:
        print(json.dumps(asdict(report)))
    else:
        print(f"copied {report.keys_copied} key(s) and {report.events_copied} audit event(s) "
              f"from {source.description} to {target.description}; already there: "
              f"{report.keys_already_there} key(s), {report.events_already_there} event(s)")
    return 0


async def _rotate_signing(settings: Settings, as_json: bool) -> int:
    if configured_keys(settings.signing) or not settings.store.shared:
        raise SettingsError("signing", "only a key set kept in a shared store is rotated here; configured "
                                       "keys rotate by adding the new key second, then moving it first "
                                       "(docs/operations.md, Rotating signing keys)")
    store = await _opened(settings)
    try:
        now = time.time()
        name = STORED_KEYS.format(algorithm=settings.signing.algorithm)
        current = await signing_keys(settings.signing, settings.data_dir, store)
        document = rotated_key_set(await store.get_or_create_secret(name, lambda: ""),
                                   settings.signing.algorithm, now)
        await store.put_secret(name, document)
        keys = stored_key_set(document, settings.signing.algorithm, now + STORED_KEYS_PUBLISH_SECONDS)
    finally:
        await store.close()
    result = {"new_kid": keys[0].kid, "signing_kid_now": current[0].kid,
              "signs_after_seconds": STORED_KEYS_PUBLISH_SECONDS}
    print(json.dumps(result) if as_json else
          f"new signing key {keys[0].kid}: published by every replica within "
          f"{STORED_KEYS_REFRESH_SECONDS:.0f} s, signing in {STORED_KEYS_PUBLISH_SECONDS:.0f} s")
    return 0


def _add_bootstrap_commands(keys: Any,
                            with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """``keys generate`` and ``keys import``: a first admin key from a Secret (docs/reference/cli.md)."""
    with_config(keys.add_parser(
        "generate", help="print a new key value, made offline (nothing is stored; see keys import)"))
    imported = with_config(keys.add_parser(
        "import", help=f"store a key value read from ${IMPORT_KEY_ENV} or standard input; idempotent"))
    imported.add_argument("--name", required=True)
    imported.add_argument("--role", action="append", required=True, dest="roles")
    imported.add_argument("--rate-limit", metavar="LIMIT",
                          help=f"the key's own rate limit: {RATE_LIMIT_HELP} (default: its roles')")


def _generate(as_json: bool) -> int:
    key = generate_key()
    print(json.dumps({"key": key.full, "preview": preview(key.lookup_id)}) if as_json else key.full)
    return 0


def _import_value() -> str:
    """The value to import: ``$TOOLIO_SIDECAR_IMPORT_KEY`` when set, else standard input (a prompt
    that does not echo when it is a terminal). Surrounding whitespace (a file's newline) is dropped."""
    from_env = os.environ.get(IMPORT_KEY_ENV)
    if from_env:
        return from_env.strip()
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("key value (not echoed): ").strip()
    return sys.stdin.read().strip()


def _import(args: argparse.Namespace, settings: Settings) -> int:
    as_json: bool = args.json
    workspace: str | None = args.workspace
    if workspace is not None:
        problem = _workspace_problem(workspace, settings)
        if problem is not None:
            return _refuse(InvalidInput("invalid_workspace", problem, "workspace"), as_json)
    value = _import_value()
    if not value:
        return _refuse(InvalidInput("invalid_key", f"no key value: set ${IMPORT_KEY_ENV} or pass it on standard "
                                                    "input (make one with `toolio-sidecar keys generate`)", "key"),
                       as_json)

    async def run() -> int:
        store = await _opened(settings)
        try:
            audit = AuditLog(store, JsonLog(stream=sys.stderr, level="warning"), Metrics(CollectorRegistry()),
                             settings.workspace)
            result = await import_key(settings, store, KeyHasher(settings.argon2), audit, value=value,
                                      name=args.name, roles=args.roles, actor="cli", workspace=workspace,
                                      rate_limit=_own_limit(args.rate_limit))
        finally:
            await store.close()
        data = key_json(result.record, settings)
        if result.roles_differ:
            print(f"note: key {result.record.name} keeps its roles ({', '.join(data['roles'])}); import never "
                  "changes an existing key", file=sys.stderr)
        if result.rate_limit_differs:
            print(f"note: key {result.record.name} keeps its rate limit ({_rate_limit_text(data)}); import never "
                  "changes an existing key (use keys update)", file=sys.stderr)
        if as_json:
            print(json.dumps({**data, "imported": result.imported}, indent=2))
        else:
            print(f"imported key {data['name']} ({data['preview']})" if result.imported else
                  f"key {data['name']} ({data['preview']}) is already there; nothing changed")
            _print_key(data, False)
        return 0

    try:
        return asyncio.run(run())
    except KeyDomainError as exc:
        return _refuse(exc, as_json)
    except SettingsError as exc:
        print(f"toolio-sidecar: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"toolio-sidecar: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _demo_command() -> Callable[..., int] | None:
    """The ``demo`` command, joined through an entry point as the admin package is: the demo
    builds on the sidecar, never the other way round. None (with a one-line message) when the
    distribution or the ``[demo]`` extra is missing."""
    found = [entry for entry in entry_points(group="toolio_sidecar.commands") if entry.name == "demo"]
    try:
        if not found:
            raise ImportError("no 'toolio_sidecar.commands' entry point named demo")
        command: Callable[..., int] = found[0].load()
    except ImportError as exc:
        print(f"toolio-sidecar: the demo needs the demo extra: pip install 'toolio-sidecar[demo]' ({exc})",
              file=sys.stderr)
        return None
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
    except BrokenPipeError:
        # The reader of stdout went away (``keys list | head``): stop quietly. Output still
        # buffered would fail again when Python flushes at exit, so stdout goes to /dev/null
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        # zsh runs the bash script through its bash-completion emulation.
        prefix = "autoload -U +X bashcompinit && bashcompinit\n" if args.shell == "zsh" else ""
        print(prefix + bash_script(parser), end="")
        return 0
    if args.command == "demo":
        run_demo = _demo_command()
        if run_demo is None:
            return 2
        roles = None
        if args.config:  # optional for the demo: only its roles are used (the rest is the demo's)
            try:
                roles = _load(args.config).roles
            except SettingsError as exc:
                return _config_refusal(exc)
        return run_demo(port=args.port, once=args.once, roles=roles)
    if args.command == "store":
        return _run_one_line(_copy(args.from_config, args.to_config, args.json))
    if args.command == "keys" and args.keys_command == "generate":
        return _generate(args.json)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        return _config_refusal(exc)
    if args.command == "migrate":
        return _run_one_line(_migrate(settings, args.json))
    if args.command == "signing":
        return _run_one_line(_rotate_signing(settings, args.json))
    if args.command == "keys" and args.keys_command == "import":
        return _import(args, settings)
    if args.command == "serve":
        from sidecar.runtime.server import serve

        try:
            _run_fast(serve(settings))
        except SettingsError as exc:  # e.g. an unreadable signing key found at start-up
            return _config_refusal(exc)
        return 0
    if args.command == "audit":
        return _audit(args, settings)
    return _keys(args, settings)


if __name__ == "__main__":
    sys.exit(main())
