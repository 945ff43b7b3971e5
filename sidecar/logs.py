"""JSON-lines logging to stdout: access lines, audit lines, errors (SPEC 6).

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


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


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

    def access(self, fields: Mapping[str, Any]) -> None:
        self.write("info", "access", fields)

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
