"""Raw-request fuzzing of the proxy listener (hypothesis, bounded).

Random request lines, field lines (names, values, line endings, folds, NULs), credentials and
bodies, sometimes pipelined, go over real sockets to a running sidecar in front of a recording
upstream. For every example:

* the sidecar stays up (``/healthz`` answers 200);
* it never answers 5xx other than 502 / 503 / 504 (and never 101);
* nothing reaches the upstream unless the example carried the valid key;
* no response carries the key (or its secret part).

The sidecar runs in its own thread and event loop so that hypothesis can drive plain blocking
sockets; every socket has a deadline, so the whole test is bounded (~200 examples).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.attack import checksum_valid_token
from tests.support.config import hardening_settings
from tests.support.harness import running_sidecar, served_in_thread
from tests.support.raw import LOOPBACK, parse_responses
from tests.support.upstreams import RecordingUpstream, recording_upstream

pytestmark = pytest.mark.timeout(120)

EXAMPLE_DEADLINE = 2.5


@dataclass
class FuzzTarget:
    """A sidecar and its recording upstream, served from a private event loop in a thread."""

    port: int
    key: str
    upstream: RecordingUpstream

    def upstream_bytes(self) -> int:
        return sum(len(c.received) for c in list(self.upstream.connections))


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    data_dir = tmp_path_factory.mktemp("fuzz")

    async def setup(stack: AsyncExitStack) -> FuzzTarget:
        upstream = await stack.enter_async_context(recording_upstream())
        settings_ = hardening_settings(data_dir, upstream.url, proxy={
            "header_timeout_seconds": 1, "keepalive_timeout_seconds": 1,
            "upstream_timeout_seconds": 1, "max_body_bytes": 4096,
        }, auth={"failures_per_minute_per_address": 100_000, "failures_per_minute_per_lookup_id": 100_000})
        sidecar = await stack.enter_async_context(running_sidecar(settings_))
        _, key = await sidecar.create_key("fuzz")
        return FuzzTarget(sidecar.proxy_port, key, upstream)

    with served_in_thread(setup, name="fuzz-sidecar") as target:
        yield target


# --- strategies ---------------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALID_KEY = "{VALID_KEY}"  # placeholder, replaced by the running sidecar's key

def mostly(common: st.SearchStrategy[str], rare: st.SearchStrategy[str], percent: int) -> st.SearchStrategy[str]:
    """``common`` ``percent``% of the time, else ``rare``."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
COMMON_METHODS = st.sampled_from(["GET", "POST", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])
ODD_METHODS = st.one_of(st.sampled_from(["CONNECT", "TRACE", "PRI", "get", "G ET"]),
                        st.text(alphabet=TCHAR, min_size=1, max_size=8), st.text(max_size=6))
COMMON_TARGETS = st.one_of(st.sampled_from(["/mcp", "/mcp", "/", "/healthz", "/.well-known/jwks.json",
                                            "/.well-known/oauth-protected-resource/mcp", "/mcp?x=1"]),
                           st.from_regex(r"/[!-~]{0,40}", fullmatch=True))
ODD_TARGETS = st.one_of(st.sampled_from(["*", "http://evil.example/x", "//evil.example/x", "evil.example:443",
                                         "/mcp?access_token=" + VALID_KEY, "/mcp?q=%74ak_x", "/%00",
                                         "/../../etc/passwd", "/mcp#frag", "/" + "a" * 9000]),
                        st.text(max_size=20))
ODD_VERSIONS = st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/0.9", ""])
COMMON_NAMES = st.sampled_from(["Content-Type", "Accept", "Mcp-Session-Id", "MCP-Protocol-Version",
                                "Last-Event-ID", "X-Toolio-Key-Id", "X_Toolio_Roles", "x-toolio-assertion",
                                "X-Forwarded-For", "Forwarded", "Connection", "Origin", "Expect", "TE",
                                "Trailer", "Keep-Alive", "Cookie", "Proxy-Authorization", "X-Custom"])
ODD_NAMES = st.one_of(st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Upgrade", "Authorization",
                                       "Host ", " Host", "Content_Length"]),
                      st.text(alphabet=TCHAR, min_size=1, max_size=12), st.text(max_size=8))
COMMON_VALUES = st.one_of(st.sampled_from(["application/json", "text/event-stream", "keep-alive", "close",
                                           "x-custom", "2025-06-18", "abc123", "100-continue",
                                           "https://evil.example", "null", "for=1.2.3.4", "127.0.0.1"]),
                          PRINTABLE)
ODD_VALUES = st.one_of(st.sampled_from(["chunked", "identity", "chunked, identity", "xchunked", "gzip, chunked",
                                        "Upgrade", "websocket", "h2c", "0", "-1", "5", "99999999999999999999",
                                        "a\x00b", "a\rb", "a\nb", " folded", "Bearer " + VALID_KEY,
                                        "Bearer tak_short", "Basic dXNlcjpwYXNz"]),
                       st.text(max_size=30))
ODD_ENDINGS = st.sampled_from([b"\n", b"\r", b"\r\r\n"])
ODD_HOSTS = st.sampled_from([b"a", b"", b"a, b", b"[::1]:80", b"evil.example:99999", b"h\x00st"])


@dataclass
class Example:
    data: bytes
    requests: int


@st.composite
def raw_request(draw: st.DrawFn, sane: bool) -> bytes:
    """One request. ``sane`` ones are well-framed (they reach authentication and, with the key,
    the upstream); the others get each part replaced by an odd one 30% of the time."""
    percent = 100 if sane else 70

    def pick(common: st.SearchStrategy[str], odd: st.SearchStrategy[str]) -> str:
        return draw(mostly(common, odd, percent))

    eol = b"\r\n" if sane or draw(st.integers(0, 99)) < 70 else draw(ODD_ENDINGS)
    method = pick(COMMON_METHODS, ODD_METHODS)
    target = pick(COMMON_TARGETS, ODD_TARGETS)
    version = pick(st.just("HTTP/1.1"), ODD_VERSIONS)
    lines = [f"{method} {target} {version}".encode("utf-8", "surrogatepass")]
    if sane or draw(st.integers(0, 9)) < 8:
        lines.append(b"Host: " + (b"sidecar.test" if sane or draw(st.booleans()) else draw(ODD_HOSTS)))
    auth = draw(st.sampled_from(["none", "valid", "valid", "valid", "wrong", "malformed", "two"]))
    if auth in ("valid", "two"):
        lines.append(b"Authorization: Bearer " + VALID_KEY.encode())
    if auth == "two":
        lines.append(b"Authorization: Bearer " + VALID_KEY.encode())
    if auth == "wrong":
        lines.append(b"Authorization: Bearer " + checksum_valid_token("Fuzzzzzz").encode())
    if auth == "malformed":
        lines.append(b"Authorization: " + pick(COMMON_VALUES, ODD_VALUES).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 4))):
        name, value = pick(COMMON_NAMES, ODD_NAMES), pick(COMMON_VALUES, ODD_VALUES)
        lines.append(name.encode("utf-8", "surrogatepass") + b": " + value.encode("utf-8", "surrogatepass"))
    body = draw(st.binary(max_size=300))
    framings = ["length", "length", "chunked"] if sane else ["length", "none", "chunked", "wrong-length"]
    framing = draw(st.sampled_from(framings))
    if framing == "length" and body:
        lines.append(f"Content-Length: {len(body)}".encode())
    elif framing == "wrong-length":
        lines.append(f"Content-Length: {len(body) + draw(st.integers(-5, 5))}".encode())
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (f"{len(body):x}".encode() + b"\r\n" + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    if draw(st.booleans()):
        lines.append(b"Connection: close")
    return eol.join(lines) + eol + eol + body


@st.composite
def raw_requests(draw: st.DrawFn) -> Example:
    count = draw(st.integers(min_value=1, max_value=2))
    sane = draw(st.integers(0, 9)) < 6
    event(f"sane={sane}")
    return Example(b"".join(draw(raw_request(sane)) for _ in range(count)), count)


# --- talking to the listener ----------------------------------------------------------------------


def send_raw(port: int, data: bytes, expected: int) -> bytes:
    """Send ``data`` and collect what comes back until the server closes, ``expected`` complete
    responses have arrived and the line goes quiet, or the example deadline passes."""
    deadline = time.monotonic() + EXAMPLE_DEADLINE
    received = bytearray()
    with socket.create_connection((LOOPBACK, port), timeout=EXAMPLE_DEADLINE) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        while (left := deadline - time.monotonic()) > 0:
            done = sum(1 for r in parse_responses(bytes(received)) if r.complete) >= expected
            sock.settimeout(min(left, 0.05 if done else 0.3))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if done or received:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            received.extend(chunk)
    return bytes(received)


def settle(target: FuzzTarget, quiet: float = 0.05, within: float = 5.0) -> None:
    """Return once the bytes reaching the upstream have not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + within
    last = target.upstream_bytes()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = target.upstream_bytes()
        if now == last:
            return
        last = now
    raise AssertionError(f"bytes kept reaching the upstream for {within} s")


def healthz(port: int) -> int:
    raw = send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 1)
    responses = parse_responses(raw)
    return responses[0].status if responses else 0


@settings(max_examples=200, deadline=None, database=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(example=raw_requests())
def test_random_raw_requests_never_crash_leak_or_reach_the_upstream_without_a_valid_key(
        fuzz_sidecar: FuzzTarget, example: Example) -> None:
    key = fuzz_sidecar.key
    data = example.data.replace(VALID_KEY.encode(), key.encode())
    carries_key = key.encode() in data
    before = fuzz_sidecar.upstream_bytes()
    raw = send_raw(fuzz_sidecar.port, data, example.requests)
    if carries_key:
        settle(fuzz_sidecar)  # a forwarded request finishes arriving before the next example
    forwarded = fuzz_sidecar.upstream_bytes() - before
    statuses = [r.status for r in parse_responses(raw)]
    event(f"statuses {statuses}")
    event("forwarded" if forwarded else "not forwarded")
    # Never a protocol switch; an interim 100 (Expect: 100-continue) is followed by a final answer.
    assert 101 not in statuses, (statuses, data[:300])
    assert all(s >= 200 for s in statuses if s != 100), (statuses, data[:300])
    # 501: a transfer coding before chunked (RFC 9112 6.1); 505: not HTTP/1.x; 502-504: the upstream.
    assert all(s < 500 or s in (501, 502, 503, 504, 505) for s in statuses), (statuses, data[:300], raw[:300])
    assert forwarded == 0 or carries_key, (data[:300], forwarded)
    assert key.encode() not in raw, raw[:300]
    assert key[12:44].encode() not in raw
    assert healthz(fuzz_sidecar.port) == 200, data[:300]


def test_fuzzed_sidecar_still_forwards_a_valid_request(fuzz_sidecar: FuzzTarget) -> None:
    before = fuzz_sidecar.upstream_bytes()
    request = (f"GET /mcp HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {fuzz_sidecar.key}\r\n"
               "Connection: close\r\n\r\n").encode()
    statuses = [r.status for r in parse_responses(send_raw(fuzz_sidecar.port, request, 1))]
    assert statuses == [200]
    assert fuzz_sidecar.upstream_bytes() > before
