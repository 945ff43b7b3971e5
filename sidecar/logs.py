"""JSON-lines logging to stdout: access lines, audit lines, errors (docs/reference/admin-api.md).

One line per record, ``{"time", "level", "type", ...}``. Nothing that reaches these lines may
carry a key or an Authorization value; as a second line of defence every line is scrubbed of
anything shaped like a key (``tak_`` + 46 base62), which is replaced by its preview.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_KEY_SHAPE = re.compile(r"tak_([0-9A-Za-z]{4})[0-9A-Za-z]{42}")


def scrub(text: str) -> str:
    return _KEY_SHAPE.sub(lambda m: f"tak_{m.group(1)}...", text) if "tak_" in text else text


_second = -1
_second_text = ""


def _now() -> str:
    """RFC 3339 UTC with milliseconds; the date-time part is formatted once per second."""
    global _second, _second_text
    t = time.time()
    whole = int(t)
    if whole != _second:
        _second, _second_text = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second_text}.{int((t - whole) * 1000):03d}Z"


def _text(value: str | None) -> str:
    """A JSON string (or null); plain printable ASCII, the usual case, skips the encoder."""
    if value is None:
        return "null"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


class JsonLog:
    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self._stream = stream if stream is not None else sys.stdout
        self.level = _LEVELS[level]

    def write(self, level: str, kind: str, fields: Mapping[str, Any]) -> None:
        if _LEVELS[level] < self.level:
            return
        line = json.dumps({"time": _now(), "level": level, "type": kind, **fields},
                          separators=(",", ":"), default=str)
        try:
            self._stream.write(scrub(line) + "\n")
        except (OSError, ValueError):  # stdout closed (e.g. a pipe reader went away): never crash
            pass

    def access(self, *, key_id: str | None, key_name: str | None, client: str | None, method: str,
               path: str, mcp_method: str | None, mcp_name: str | None, status: int, duration_ms: float,
               bytes_in: int | None, bytes_out: int, kind: str | None = None,
               workspace: str | None = None) -> None:
        """One access line per proxied request; hand-assembled because it runs on every request
        (json.dumps of the same dict costs several times more). Same shape as :meth:`write`.
        ``kind``: key, user or passthrough (docs/reference/metrics.md); a pass-through request has
        no identity the sidecar knows, so it logs none."""
        if self.level > 20:
            return
        if kind == "passthrough":
            key_id = key_name = None
        line = (f'{{"time":"{_now()}","level":"info","type":"access","kind":{_text(kind)},'
                f'"workspace":{_text(workspace)},"key_id":{_text(key_id)},'
                f'"key_name":{_text(key_name)},"client":{_text(client)},"method":{_text(method)},'
                f'"path":{_text(path)},"mcp_method":{_text(mcp_method)},"mcp_name":{_text(mcp_name)},'
                f'"status":{status},"duration_ms":{duration_ms:.3f},'
                f'"bytes_in":{"null" if bytes_in is None else bytes_in},"bytes_out":{bytes_out}}}\n')
        try:
            self._stream.write(scrub(line) if "tak_" in line else line)
        except (OSError, ValueError):
            pass

    def info(self, message: str, **fields: Any) -> None:
        self.write("info", "event", {"message": message, **fields})

    def warning(self, message: str, **fields: Any) -> None:
        self.write("warning", "event", {"message": message, **fields})

    def error(self, message: str, **fields: Any) -> None:
        self.write("error", "error", {"message": message, **fields})

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


class _JsonHandler(logging.Handler):
    """Routes library log records (aiohttp, asyncio) into the same JSON stream."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= 40 else "warning" if record.levelno >= 30 else \
            "info" if record.levelno >= 20 else "debug"
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = logging.Formatter().formatException(record.exc_info)
        self._log.write(level, "error" if record.levelno >= 40 else "log", fields)


def install(log: JsonLog) -> None:
    """Send stdlib logging through ``log``; aiohttp's own access log is off (we write ours)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_JsonHandler(log))
    root.setLevel(max(log.level, logging.INFO))
