"""Server-sent events framing (HTML Living Standard, 9.2.5 "Parsing an event stream"): cutting a
byte stream into whole events, and reading or rewriting one event's data.

Lines end with CRLF, LF or CR; a blank line ends an event. Bytes pass through unchanged: the
splitter only decides where each event ends, so a stream relayed event by event is byte for
byte the stream received.
"""

from __future__ import annotations

import re

_EOL = re.compile(rb"\r\n|\r|\n")
# Only these end a line in an event stream (str.splitlines() would also split at U+2028 and others).
_TEXT_EOL = re.compile(r"\r\n|\r|\n")


class EventTooLarge(Exception):
    """One event grew past the splitter's limit without ending."""


class EventSplitter:
    """Feed it the stream's chunks; it hands back complete events (each with the blank line
    that ends it) and keeps the incomplete rest, up to ``limit`` bytes."""

    __slots__ = ("_buffer", "_limit", "_line_start")

    def __init__(self, limit: int) -> None:
        self._buffer = b""
        self._limit = limit
        self._line_start = 0  # where the current, unfinished line starts in the buffer

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        events: list[bytes] = []
        event_start = 0
        line_start = self._line_start
        # A CR at the very end may be the first half of a CRLF: it is judged with the next chunk.
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        for match in _EOL.finditer(buffer, line_start, end):
            if match.start() == line_start:  # a blank line: the event is complete
                events.append(buffer[event_start:match.end()])
                event_start = match.end()
            line_start = match.end()
        self._buffer = buffer[event_start:]
        self._line_start = line_start - event_start
        if len(self._buffer) > self._limit:
            raise EventTooLarge(f"an event is larger than {self._limit} bytes")
        return events

    def rest(self) -> bytes:
        """What is left at the end of the stream (an unfinished event; a client drops it)."""
        rest, self._buffer, self._line_start = self._buffer, b"", 0
        return rest


def event_data(event: bytes) -> str | None:
    """The event's data (its ``data`` lines joined with LF), or None if it has none or is not UTF-8."""
    try:
        text = event.decode("utf-8")
    except UnicodeDecodeError:
        return None
    data: list[str] = []
    for line in _TEXT_EOL.split(text):
        if line.startswith("data"):
            field, _, value = line.partition(":")
            if field != "data":
                continue
            data.append(value[1:] if value.startswith(" ") else value)
    return "\n".join(data) if data else None


def with_data(event: bytes, data: str) -> bytes:
    """The event with its data replaced by ``data`` (one line, no line breaks), every other field
    kept in place: the first data line carries the new data and the others are dropped."""
    lines: list[str] = []
    placed = False
    for line in _TEXT_EOL.split(event.decode("utf-8")):
        if not line:
            continue
        if line.partition(":")[0] == "data":
            if not placed:
                lines.append(f"data: {data}")
                placed = True
            continue
        lines.append(line)
    return ("\n".join(lines) + "\n\n").encode()
