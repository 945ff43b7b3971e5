"""Server-sent events framing (HTML Living Standard, 9.2.5 "Parsing an event stream"): cutting a
byte stream into whole events, and reading or rewriting one event's data.

Lines end with CRLF, LF or CR; a blank line ends an event. Bytes pass through unchanged: the
splitter only decides where each event ends, so a stream relayed event by event is byte for
byte the stream received.
"""

from __future__ import annotations


class EventTooLarge(Exception):
    """One event grew past the splitter's limit without ending."""


class EventSplitter:
    """Feed it the stream's chunks; it hands back complete events (each with the blank line
    that ends it) and keeps the incomplete rest, up to ``limit`` bytes.

    Each byte is scanned once (``bytearray.find`` runs in C), however small the chunks a large
    event arrives in."""

    __slots__ = ("_buffer", "_event_start", "_limit", "_line_start", "_scan")

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._event_start = 0
        self._line_start = 0  # where the current, unfinished line starts
        self._scan = 0  # where the search for the next line end resumes (all before it is line)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        events: list[bytes] = []
        position = self._scan
        lf = buffer.find(b"\n", position)
        cr = buffer.find(b"\r", position)
        scan = size
        while lf != -1 or cr != -1:
            if cr == -1 or (lf != -1 and lf < cr):
                at, end = lf, lf + 1
            elif cr + 1 == size:
                scan = cr  # a CR at the very end may be the first half of a CRLF: judged with the next chunk
                break
            else:
                at, end = cr, cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            if at == self._line_start:  # a blank line: the event is complete
                events.append(bytes(buffer[self._event_start:end]))
                self._event_start = end
            self._line_start = position = end
            if lf != -1 and lf < position:
                lf = buffer.find(b"\n", position)
            if cr != -1 and cr < position:
                cr = buffer.find(b"\r", position)
        self._scan = scan
        if self._event_start:
            del buffer[:self._event_start]
            self._line_start -= self._event_start
            self._scan -= self._event_start
            self._event_start = 0
        if len(buffer) > self._limit:
            raise EventTooLarge(f"an event is larger than {self._limit} bytes")
        return events

    def rest(self) -> bytes:
        """What is left at the end of the stream (an unfinished event; a client drops it)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._line_start = self._event_start = self._scan = 0
        return rest


def event_data(event: bytes) -> str | None:
    """The event's data (its ``data`` lines joined with LF), or None if it has none or is not UTF-8."""
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data"):
            field, _, value = line.partition(b":")
            if field != b"data":
                continue
            data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    try:
        return b"\n".join(data).decode("utf-8")
    except UnicodeDecodeError:
        return None


def with_data(event: bytes, data: str) -> bytes:
    """The event with its data replaced by ``data`` (one line, no line breaks), every other field
    kept in place: the first data line carries the new data and the others are dropped."""
    lines: list[bytes] = []
    placed = False
    for line in event.splitlines():
        if not line:
            continue
        if line.partition(b":")[0] == b"data":
            if not placed:
                lines.append(b"data: " + data.encode())
                placed = True
            continue
        lines.append(line)
    return b"\n".join(lines) + b"\n\n"
