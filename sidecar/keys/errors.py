"""What the key domain refuses, with no HTTP in it: each front end (the admin API, the CLI)
maps these to its own answer (422 / 404 / 409; exit 2 / 1)."""

from __future__ import annotations

from typing import Any


class KeyDomainError(Exception):
    """``code`` is stable and machine-readable; ``field`` names the offending input, if any."""

    def __init__(self, code: str, message: str, field: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}


class InvalidInput(KeyDomainError):
    """A value that can never be accepted as given (a bad name, role, time or id)."""


class KeyNotFound(KeyDomainError):
    def __init__(self, key_id: str, *, by_name: bool = False) -> None:
        super().__init__("not_found", f"no key with id {'or name ' if by_name else ''}{key_id!r}", "id")


class NameTaken(KeyDomainError):
    def __init__(self, name: str) -> None:
        super().__init__("name_taken", f"a key named {name!r} already exists in this workspace", "name")
