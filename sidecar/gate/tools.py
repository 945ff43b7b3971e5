"""Per-role tool patterns: which MCP tools a key may see and call (docs/reference/tool-policy.md).

A key's policy is the union of its roles' ``tools`` patterns (``fnmatch`` syntax, matched
case-sensitively as MCP tool names are); a role without ``tools`` allows every tool, and then the
key has no policy at all (``None``). Policies are compiled once per distinct set of patterns.

``tools/list`` results are filtered here: a JSON-RPC response whose ``result.tools`` is a list
keeps only the tools the key may call. Anything in that list that is not a tool with a string
name is dropped (what cannot be checked is not shown).
"""

from __future__ import annotations

import fnmatch
import json
import re
from functools import lru_cache
from typing import Any

# A filtered list depends on the caller: it must not be reused for another one (MCP 2026-07-28,
# caching: "private" results are reusable only within the authorization context that made them).
PRIVATE = "private"
# What marks an answer worth parsing: any tools/list result names its "tools" member, unless it
# spells the name with escapes, which an answer with a backslash-u sequence is parsed to rule out.
_TOOLS_MEMBER = b'"tools"'
_ESCAPE = b"\\u"


class Unfilterable(ValueError):
    """An answer that may hold a tool list but cannot be read or rewritten as JSON: it is not
    passed on (what cannot be checked is not shown)."""


def may_hold_tools(data: bytes) -> bool:
    return _TOOLS_MEMBER in data or _ESCAPE in data


def load_answer(data: bytes | str) -> Any:
    """Parsed JSON of an answer that may hold a tool list; :class:`Unfilterable` if unreadable."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8, huge integers
        raise Unfilterable(f"not readable JSON: {exc.__class__.__name__}") from None


def dumps(value: Any) -> str:
    """Compact JSON; a value JSON cannot carry (an infinite number) makes the answer unfilterable."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise Unfilterable(f"cannot be written as JSON: {exc.__class__.__name__}") from None


class ToolPolicy:
    """The tools one set of patterns allows."""

    __slots__ = ("_match", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        # fnmatch.translate gives an anchored regular expression per pattern; one alternation
        # matches a name in one call however many patterns there are.
        self._match = (re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match
                       if patterns else None)

    def allows(self, tool: str) -> bool:
        return self._match is not None and self._match(tool) is not None

    def filter_result(self, message: Any) -> bool:
        """Filter one JSON-RPC message in place if it is a ``tools/list`` result; True if it was."""
        if not isinstance(message, dict):
            return False
        result = message.get("result")
        if not isinstance(result, dict):
            return False
        tools = result.get("tools")
        if not isinstance(tools, list):
            return False
        result["tools"] = [tool for tool in tools if isinstance(tool, dict)
                           and isinstance(name := tool.get("name"), str) and self.allows(name)]
        if "cacheScope" in result:
            result["cacheScope"] = PRIVATE
        return True

    def filter_value(self, value: Any) -> bool:
        """Filter a decoded JSON-RPC message or batch of answers in place; True if it changed."""
        if isinstance(value, list):
            changed = False
            for element in value:
                changed = self.filter_result(element) or changed
            return changed
        return self.filter_result(value)

    def filter_json(self, body: bytes) -> bytes:
        """A JSON body (one message or a batch's array of answers) with every ``tools/list``
        result filtered; anything else unchanged, byte for byte. Raises :class:`Unfilterable`
        for a body that may hold a tool list but is not JSON this filter can read and rewrite."""
        if not may_hold_tools(body):
            return body
        value = load_answer(body)
        if not self.filter_value(value):
            return body
        return dumps(value).encode()


@lru_cache(maxsize=256)
def policy_for(patterns: tuple[str, ...]) -> ToolPolicy:
    """The compiled policy of a sorted pattern tuple (shared by every key with those roles)."""
    return ToolPolicy(patterns)
