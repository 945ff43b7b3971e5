"""Cutting an event stream into events: wherever the chunks split it, the same events, byte for
byte, and nothing decided about a CR before the byte after it is known."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http.sse import EventSplitter, EventTooLarge, event_data, with_data

STREAM = (b"event: message\r\nid: 1\r\ndata: {\"a\":1}\r\n\r\n"
          b": a comment\n\n"
          b"data: first\rdata: second\r\r"
          b"data: x\ndata: y\n\n"
          b"data: unfinished")
EVENTS = [b"event: message\r\nid: 1\r\ndata: {\"a\":1}\r\n\r\n", b": a comment\n\n",
          b"data: first\rdata: second\r\r", b"data: x\ndata: y\n\n"]


def _split(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter(1 << 20)
    events: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += splitter.feed(stream[start:cut])
        start = cut
    return events, splitter.rest()


def test_events_end_at_blank_lines_with_any_line_ending() -> None:
    events, rest = _split(STREAM, [])
    assert events == EVENTS
    assert rest == b"data: unfinished"


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_the_same_events_wherever_the_stream_is_cut(cuts: list[int]) -> None:
    assert _split(STREAM, cuts) == (EVENTS, b"data: unfinished")


def test_a_cr_at_a_chunk_end_waits_for_the_next_byte() -> None:
    # "data: a\r" + "\ndata: b\n\n" is one event with two data lines, not an event ending at "\r\n".
    splitter = EventSplitter(1024)
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\ndata: b\n\n") == [b"data: a\r\ndata: b\n\n"]


def test_an_event_past_the_limit_is_refused() -> None:
    splitter = EventSplitter(64)
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: " + b"x" * 100)


def test_event_data_joins_data_lines_and_ignores_other_fields() -> None:
    event = b"event: message\nid: 7\ndata:{\"a\":\ndata:  1}\ndatum: no\n: comment\n\n"
    assert event_data(event) == '{"a":\n 1}'
    assert event_data(b"id: 1\n\n") is None
    assert event_data(b"data: \xff\n\n") is None


def test_event_data_splits_lines_only_at_cr_and_lf() -> None:
    # U+2028 is a line break to str.splitlines(), not to an event stream.
    assert event_data("data: a\u2028b\n\n".encode()) == "a\u2028b"


def test_with_data_keeps_the_other_fields_in_place() -> None:
    event = b"event: message\r\nid: 9\r\ndata: one\r\ndata: two\r\nretry: 5\r\n\r\n"
    assert with_data(event, "{}") == b"event: message\nid: 9\ndata: {}\nretry: 5\n\n"
