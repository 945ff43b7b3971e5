"""Benchmark driver: the sidecar against nginx and a bare aiohttp proxy, measured side by side.

Method (see the project's performance notes): wrk (1 thread) and the upstream pinned to CPU 0,
the proxy under test alone on CPU 1; a warm-up before every run; 3+ rounds with the target
order rotated each round; ratios paired within a round, then the median; proxy CPU time per
request from /proc/<pid>/stat; steal time and CPU taken by other jobs on the run's CPUs from
/proc/stat: disturbed runs are repeated, disturbed rounds discarded. Then the real MCP SDK
server direct vs behind the proxies (10 connections, p50), and SSE: time to first event, RSS per
idle open stream, upstream connections released after the clients disconnect.

Run from the repository root:  .venv/bin/python bench/run.py [--duration 10 --rounds 3 --write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_CPU = 0  # wrk, the upstreams and this driver
PROXY_CPU = 1  # the proxy under test, alone
TRIVIAL_BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"plans","arguments":{}}}'
JSON_HEADERS = {"Content-Type": "application/json"}
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/call",
    "Mcp-Name": "add",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if this driver is SIGKILLed, children still get SIGTERM.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Procs:
    """Every process the driver starts; all of them are stopped on exit, whatever happens."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self.running: list[subprocess.Popen[bytes]] = []
        self.outputs: dict[str, list[Path]] = {}

    def start(
        self, name: str, argv: Sequence[str], cpu: int | None, stdout: Path | None = None
    ) -> subprocess.Popen[bytes]:
        cmd = list(argv)
        if cpu is not None and self.pin:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        err_path = self.logdir / f"{name}.err"
        out_path = stdout or self.logdir / f"{name}.out"
        self.outputs[name] = [out_path, err_path]
        with open(err_path, "wb") as err, open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: this driver runs no threads
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                log(f"could not stop pid {proc.pid}: {exc}")

    def log_tail(self, name: str, lines: int = 10) -> str:
        """The last lines of the process's stdout and stderr."""
        tail: list[str] = []
        for path in self.outputs.get(name, []):
            if path.exists():
                tail += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(tail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_status(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_ready(
    procs: Procs, name: str, proc: subprocess.Popen[bytes], check: Callable[[], bool], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{procs.log_tail(name)}")


# ---------------------------------------------------------------- /proc readings


def tree_pids(pid: int) -> list[int]:
    """The process and its descendants (nginx: master and worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return out


def cpu_ticks(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@dataclass(frozen=True)
class CpuSample:
    """Jiffies of one CPU (or of all, when nothing is pinned), and those the benchmark used there."""

    total: int
    steal: int
    busy: int  # user + nice + system
    ours: int


def machine_sample(env: Env) -> dict[str, CpuSample]:
    """Per CPU: /proc/stat against the CPU time of our own processes pinned there. The driver and
    its reaped children (wrk, py-spy) run on the load CPU."""
    t = os.times()
    driver = round((t.user + t.system + t.children_user + t.children_system) * CLK_TCK)
    ours: dict[str, int] = {}
    for target in env.targets.values():
        key = f"cpu{target.cpu}" if env.pin else "cpu"
        ours[key] = ours.get(key, 0) + cpu_ticks(target.pid)
    load_key = f"cpu{LOAD_CPU}" if env.pin else "cpu"
    ours[load_key] = ours.get(load_key, 0) + driver
    out: dict[str, CpuSample] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name in ((f"cpu{LOAD_CPU}", f"cpu{PROXY_CPU}") if env.pin else ("cpu",)):
            f = [int(x) for x in vals[:8]]
            out[name] = CpuSample(total=sum(f), steal=f[7], busy=f[0] + f[1] + f[2], ours=ours.get(name, 0))
    return out


def machine_load(a: dict[str, CpuSample], b: dict[str, CpuSample], cpus: Sequence[str]) -> tuple[float, float]:
    """(steal %, other %) on the CPUs a run uses, the worse CPU counting. "Other" is CPU time
    taken there by processes outside the benchmark (another job on the box): it disturbs a run
    as much as steal does."""
    steal = other = 0.0
    for c in cpus:
        if c not in a or c not in b:
            continue
        total = b[c].total - a[c].total
        if total <= 0:
            continue
        foreign = max(0, (b[c].busy - a[c].busy) - (b[c].ours - a[c].ours))
        steal = max(steal, 100.0 * (b[c].steal - a[c].steal) / total)
        other = max(other, 100.0 * foreign / total)
    return steal, other


def wait_quiet(env: Env, target: Target) -> None:
    """Before a run: wait (at most --quiet-wait s) until other jobs leave the run's CPUs alone."""
    a = env.args
    cpus, start = used_cpus(env, target), time.monotonic()
    while time.monotonic() - start < a.quiet_wait:
        s0 = machine_sample(env)
        time.sleep(1.0)
        steal, other = machine_load(s0, machine_sample(env), cpus)
        if steal <= a.max_steal and other <= a.max_other:
            break
    waited = time.monotonic() - start
    if waited > 1.5:
        log(f"  waited {waited:.0f} s for other jobs to leave the CPUs alone")


def used_cpus(env: Env, target: Target | None) -> list[str]:
    if not env.pin:
        return ["cpu"]
    cpus = {LOAD_CPU} if target is None or target.cpu == LOAD_CPU else {LOAD_CPU, target.cpu}
    return [f"cpu{c}" for c in sorted(cpus)]


def established(pid: int, *, local_port: int | None = None, remote_port: int | None = None) -> int:
    """ESTABLISHED TCP sockets owned by the process tree, filtered by port."""
    inodes: set[str] = set()
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "01" or cols[9] not in inodes:
                    continue
                lport = int(cols[1].rsplit(":", 1)[1], 16)
                rport = int(cols[2].rsplit(":", 1)[1], 16)
                if (local_port is None or lport == local_port) and (remote_port is None or rport == remote_port):
                    count += 1
    return count


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class Run:
    target: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None
    steal: float
    other: float
    server_cpu_us: float | None = None  # the upstream server's CPU per request during the run


@dataclass
class Round:
    runs: dict[str, Run]
    steal: float
    other: float


def lua_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    text = body.decode().strip()
    assert "]==]" not in text
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(env: Env, target: str, script: Path, conns: int, duration: float, measure: bool = True) -> Run:
    t = env.targets[target]
    url = f"http://{HOST}:{t.port}/mcp"
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    if env.pin:
        cmd = ["taskset", "-c", str(LOAD_CPU), *cmd]
    ensure_alive(env, t)
    # The upstream server behind a proxy (a direct target of the same port), measured as well: in
    # front of the MCP server, throughput follows the server's own CPU per call.
    server = t if t.direct else next(
        (x for x in env.targets.values() if x.direct and x.port == t.upstream_port), None)
    s0 = cpu_ticks(server.pid) if server is not None else 0
    ticks0, m0 = cpu_ticks(t.pid), machine_sample(env)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    except subprocess.CalledProcessError as exc:
        ensure_alive(env, t)
        raise RuntimeError(f"wrk failed against {target}: {exc.stdout}{exc.stderr}") from exc
    ticks1, m1 = cpu_ticks(t.pid), machine_sample(env)
    s1 = cpu_ticks(server.pid) if server is not None else 0
    steal, other = machine_load(m0, m1, used_cpus(env, t))

    def num(pattern: str) -> str:
        m = re.search(pattern, out, re.MULTILINE)
        if not m:
            raise RuntimeError(f"unexpected wrk output for {target}:\n{out}")
        return m.group(1)

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    requests = int(num(r"(\d+) requests in"))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    cpu_us = (ticks1 - ticks0) / CLK_TCK / requests * 1e6 if measure and requests else None
    server_cpu_us = (s1 - s0) / CLK_TCK / requests * 1e6 if measure and requests and server is not None else None
    return Run(
        target=target,
        requests=requests,
        rps=float(num(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        errors=errors,
        cpu_us=cpu_us,
        steal=steal,
        other=other,
        server_cpu_us=server_cpu_us,
    )


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    label: str
    port: int
    pid: int  # the process whose CPU/RSS is measured (the proxy; the server when direct)
    upstream_port: int
    cpu: int  # the CPU it is pinned to
    direct: bool = False


@dataclass
class Env:
    args: argparse.Namespace
    tmp: Path
    procs: Procs
    pin: bool
    token: str = ""  # the key nginx allows (the sidecar's own key when there is a sidecar)
    targets: dict[str, Target] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # each sidecar instance issues its own key
    cleanups: list[Callable[[], object]] = field(default_factory=list)


def sidecar_cli() -> list[str] | None:
    """The sidecar's console script, if the package is installed and answers --help."""
    if not (REPO / "sidecar" / "__main__.py").exists():
        return None
    script = Path(PY).parent / "toolio-sidecar"
    cmd = [str(script)] if script.exists() else [PY, "-m", "sidecar"]
    try:
        ok = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else None


def start_python(env: Env, name: str, module: str, cpu: int, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = env.procs.start(name, [PY, "-m", module, "--port", str(port), *extra], cpu)
    return proc


def start_upstream(env: Env, name: str) -> Target:
    port = free_port()
    proc = start_python(env, name, "bench.upstream", LOAD_CPU, port)
    wait_ready(env.procs, name, proc, lambda: http_status(port, "POST", "/mcp", body=b"{}") == 200)
    return Target(name, "trivial upstream, direct", port, proc.pid, port, LOAD_CPU, direct=True)


def start_mcp_server(env: Env, name: str) -> Target:
    port = free_port()
    proc = start_python(env, name, "bench.mcp_server", LOAD_CPU, port)
    body = (BENCH / "mcp_request.json").read_bytes()

    def ok() -> bool:
        return http_status(port, "POST", "/mcp", MCP_HEADERS, body) == 200

    wait_ready(env.procs, name, proc, ok)
    return Target(name, "MCP SDK server, direct", port, proc.pid, port, LOAD_CPU, direct=True)


def start_bare(env: Env, name: str, upstream: Target, label: str) -> Target:
    port = free_port()
    proc = start_python(env, name, "bench.bare_proxy", PROXY_CPU, port, "--upstream", f"http://{HOST}:{upstream.port}")
    wait_ready(env.procs, name, proc, lambda: http_status(port, "GET", "/sse-probe-404") > 0)
    return Target(name, label, port, proc.pid, upstream.port, PROXY_CPU)


def start_nginx(env: Env, name: str, upstream: Target,
                label: str = "nginx (key map + proxy_pass, keepalive upstream)",
                headers: dict[str, str] | None = None, body: bytes = b"{}") -> Target:
    port = free_port()
    workdir = env.tmp / name
    workdir.mkdir()
    conf = (BENCH / "nginx.conf.template").read_text()
    for key, value in {
        "@USER_LINE@": "user root;" if os.geteuid() == 0 else "",
        "@DIR@": str(workdir),
        "@TOKEN@": env.token,
        "@UPSTREAM@": f"{HOST}:{upstream.port}",
        "@LISTEN@": f"{HOST}:{port}",
    }.items():
        conf = conf.replace(key, value)
    (workdir / "nginx.conf").write_text(conf)
    argv = ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    proc = env.procs.start(name, argv, PROXY_CPU)
    auth = {**(headers or {}), "Authorization": f"Bearer {env.token}"}
    wait_ready(env.procs, name, proc, lambda: http_status(port, "POST", "/mcp", auth, body) == 200)
    if http_status(port, "POST", "/mcp", {}, body) != 401:
        raise RuntimeError("nginx accepted a request without the key")
    return Target(name, label, port, proc.pid, upstream.port, PROXY_CPU)


def start_sidecar(env: Env, cli: list[str], name: str, upstream: Target, label: str, extra: str = "",
                  role: str = "") -> Target:
    port, admin_port = free_port(), free_port()
    data = env.tmp / f"{name}-data"
    data.mkdir()
    cfg = env.tmp / f"{name}.toml"

    def write_config(pool: str) -> None:
        cfg.write_text(
            f'workspace = "bench"\ndata_dir = "{data}"\nlog_level = "info"\n\n'
            f'[proxy]\nlisten = "{HOST}:{port}"\nupstream = "http://{HOST}:{upstream.port}"\n{pool}\n'
            f'[admin]\nlisten = "{HOST}:{admin_port}"\n\n'
            '[roles.viewer]\ndescription = "bench"\npermissions = ["plans:read"]\n'
            f"{role}{extra}"
        )

    def create_key() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "keys", "create", "--config", str(cfg), "--name", "bench", "--role", "viewer", "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    # The idle-stream test needs more concurrent upstream connections than a default pool may
    # allow, and holds them all with one key: more than its default bound of requests in flight.
    # The pool-size key is not part of the config contract: without it if refused.
    write_config(f"upstream_max_connections = {max(1000, env.args.streams + 200)}\n"
                 "max_concurrent_requests_per_key = 0\n")
    created = create_key()
    if created.returncode == 2 and "upstream_max_connections" in created.stderr:
        log(f"{name}: config refuses upstream_max_connections; using the sidecar's default pool")
        write_config("")
        created = create_key()
    if created.returncode != 0:
        raise RuntimeError(f"keys create failed ({created.returncode}): {created.stderr.strip()}")
    key = str(json.loads(created.stdout)["key"])
    access_log = env.tmp / f"{name}.access.jsonl"
    proc = env.procs.start(name, [*cli, "serve", "--config", str(cfg)], PROXY_CPU, stdout=access_log)
    wait_ready(env.procs, name, proc, lambda: http_status(admin_port, "GET", "/readyz") == 200)
    env.tokens[name] = key
    return Target(name, label, port, proc.pid, upstream.port, PROXY_CPU)


def postgres_database(env: Env) -> str | None:
    """A fresh database on ``--postgres-url``'s server for the sidecar-pg target (dropped by
    the caller's cleanup), or None when no server answers there."""
    base: str = env.args.postgres_url
    if not base:
        return None
    name = f"toolio_bench_{os.getpid()}"
    script = ("import asyncio, asyncpg, sys\n"
              "async def main():\n"
              "    con = await asyncpg.connect(sys.argv[1], timeout=3)\n"
              "    await con.execute(f'DROP DATABASE IF EXISTS {sys.argv[2]}')\n"
              "    await con.execute(f'CREATE DATABASE {sys.argv[2]}')\n"
              "    await con.close()\n"
              "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", script, base, name], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        log(f"no PostgreSQL at --postgres-url ({done.stderr.strip().splitlines()[-1:]}): sidecar-pg skipped")
        return None
    env.cleanups.append(lambda: subprocess.run([sys.executable, "-c", script.replace(
        "    await con.execute(f'CREATE DATABASE {sys.argv[2]}')\n", ""), base, name],
        capture_output=True, timeout=30, check=False))
    return base.rsplit("/", 1)[0] + "/" + name


def ensure_alive(env: Env, t: Target) -> None:
    """A target that died mid-benchmark is an error worth its log, not a wrk failure."""
    for proc in env.procs.running:
        if proc.pid == t.pid and proc.poll() is not None:
            raise RuntimeError(f"{t.name} exited with {proc.returncode}:\n{env.procs.log_tail(t.name)}")


def token_for(env: Env, target: str) -> str:
    return env.tokens.get(target, env.token)


# ---------------------------------------------------------------- rounds


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_rounds(env: Env, names: list[str], body: bytes, headers: dict[str, str], conns: int) -> list[Round]:
    a = env.args
    scripts = {
        n: lua_script(env.tmp / f"{n}.lua", body, {**headers, "Authorization": f"Bearer {token_for(env, n)}"})
        for n in names
    }
    rounds: list[Round] = []
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        results: dict[str, Run] = {}
        for n in order:
            best: Run | None = None
            for attempt in range(1 + a.retries):
                wait_quiet(env, env.targets[n])
                if a.warmup > 0:
                    wrk(env, n, scripts[n], conns, a.warmup, measure=False)
                run = wrk(env, n, scripts[n], conns, a.duration)
                cpu = f"{run.cpu_us:.0f}" if run.cpu_us is not None else "-"
                log(
                    f"round {r + 1} {n:<12} {run.rps:8.0f} rps  p50 {run.p50_ms:6.2f} ms  cpu {cpu:>5} us/req  "
                    f"errors {run.errors}  steal {run.steal:.1f}%  other {run.other:.1f}%"
                )
                if best is None or max(run.steal, run.other) < max(best.steal, best.other):
                    best = run
                if run.steal <= a.max_steal and run.other <= a.max_other:
                    break
                if attempt < a.retries:
                    log("  disturbed (steal or other jobs on these CPUs): running it again")
            assert best is not None
            results[n] = best
        steal = max(x.steal for x in results.values())
        other = max(x.other for x in results.values())
        rounds.append(Round(results, steal, other))  # in the order they ran
    return rounds


def kept(env: Env, rounds: list[Round]) -> tuple[list[Round], str]:
    """Rounds with a run disturbed by steal or by other jobs on its CPUs are left out (unless all
    are). A round's steal/other is its worst run's."""
    a = env.args
    good = [r for r in rounds if r.steal <= a.max_steal and r.other <= a.max_other]
    loads = ", ".join(f"{r.steal:.1f}%/{r.other:.1f}%" for r in rounds)
    note = f"steal/other CPU per round: {loads}; limits {a.max_steal:g}%/{a.max_other:g}%"
    if not good:
        return rounds, (
            f"all {len(rounds)} rounds kept although over the limits ({note}). Other jobs were running: "
            "they slow the runs that need both CPUs more than the direct runs, which leave one idle; "
            "CPU µs/req and proxy-vs-proxy ratios hold up better than ratios against direct"
        )
    return good, f"{len(good)}/{len(rounds)} rounds kept ({note})"


def ratio(rounds: list[Round], name: str, ref: str) -> str:
    vals = [r.runs[name].rps / r.runs[ref].rps for r in rounds if r.runs[ref].rps > 0]
    return f"{median(vals):.2f}x" if vals else "-"


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def throughput_table(env: Env, rounds: list[Round], names: list[str], conns: int) -> str:
    good, note = kept(env, rounds)
    refs = [n for n in ("direct", "nginx", "bare") if n in names]
    head = ["target", "rps"] + [f"vs {n}" for n in refs] + ["CPU µs/req*", "p50 ms", "p99 ms", "errors"]
    lines = [
        f"POST /mcp, 300 B JSON answer, {conns} connections, wrk 1 thread, {env.args.duration:g} s runs; {note}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n in names:
        runs = [r.runs[n] for r in good]
        cpus = [x.cpu_us for x in runs if x.cpu_us is not None]
        cpu = fmt(median(cpus)) if cpus else "-"
        if env.targets[n].direct and cpus:
            cpu = f"({cpu} server)"
        row = [f"{n}: {env.targets[n].label}", fmt(median([x.rps for x in runs]))]
        row += [ratio(good, n, ref) for ref in refs]
        row += [
            cpu,
            fmt(median([x.p50_ms for x in runs]), ".2f"),
            fmt(median([x.p99_ms for x in runs]), ".2f"),
            str(sum(x.errors for x in runs)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "*CPU time of the proxy process(es) per request; for a direct target, the server's."]
    # Each variant against the plain sidecar, paired within rounds: what the capability costs.
    variants = [n for n in names if n.startswith("sidecar-") and "sidecar" in names]
    if variants:
        lines += ["", "| variant | vs sidecar (rps, paired) | p50 added |", "|---|---|---|"]
        base_p50 = median([r.runs["sidecar"].p50_ms for r in good])
        for n in variants:
            p50 = median([r.runs[n].p50_ms for r in good])
            lines.append(f"| {n} | {ratio(good, n, 'sidecar')} | {p50 - base_p50:+.3f} ms |")
    return "\n".join(lines)


def mcp_table(env: Env, rounds: list[Round], names: list[str]) -> str:
    good, note = kept(env, rounds)
    lines = [
        f"tools/call (2026-07-28 stateless, JSON response), {env.args.mcp_connections} connections, "
        f"{env.args.duration:g} s runs; {note}.",
        "",
        "| target | rps | vs direct | p50 ms | p50 added vs direct | CPU µs/req* | server CPU µs/call | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        runs = [r.runs[n] for r in good]
        cpus = [x.cpu_us for x in runs if x.cpu_us is not None]
        cpu = fmt(median(cpus)) if cpus else "-"
        if env.targets[n].direct and cpus:
            cpu = f"({cpu} server)"
        added = [r.runs[n].p50_ms - r.runs["mcp-direct"].p50_ms for r in good if "mcp-direct" in r.runs]
        server_cpus = [x.server_cpu_us for x in runs if x.server_cpu_us is not None]
        lines.append(
            f"| {n}: {env.targets[n].label} | {fmt(median([x.rps for x in runs]))} | "
            f"{ratio(good, n, 'mcp-direct')} | {fmt(median([x.p50_ms for x in runs]), '.2f')} | "
            f"{'-' if env.targets[n].direct else fmt(median(added), '+.2f') + ' ms'} | {cpu} | "
            f"{fmt(median(server_cpus)) if server_cpus else '-'} | {sum(x.errors for x in runs)} |"
        )
    return "\n".join(lines)


def rounds_detail(rounds: list[Round]) -> str:
    """Runs in the order they ran."""
    lines = [
        "| round | target | rps | p50 ms | CPU µs/req | errors | steal % | other CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        for x in r.runs.values():
            lines.append(
                f"| {i} | {x.target} | {x.rps:,.0f} | {x.p50_ms:.2f} | {fmt(x.cpu_us)} | {x.errors} "
                f"| {x.steal:.1f} | {x.other:.1f} |"
            )
        lines.append(f"| {i} | (whole round) | | | | | {r.steal:.1f} | {r.other:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- SSE


class SseClient:
    """A raw HTTP/1.1 client: GET /sse and read until the first complete SSE event."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.request = (
            f"GET /sse HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()

    async def open(self) -> tuple[float, asyncio.StreamWriter]:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            writer.write(self.request)
            buf = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError(f"closed before the first event: {buf[:200]!r}")
                buf += chunk
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                if buf.split(b" ", 2)[1] != b"200":
                    raise ConnectionError(f"status line {buf.splitlines()[0]!r}")
                if b"\n\n" in buf[end + 4 :]:
                    return time.perf_counter() - t0, writer
        except BaseException:
            writer.close()
            raise


@dataclass
class SseResult:
    target: str
    ttfe_p50_ms: float
    ttfe_p90_ms: float
    opened: int
    failed: int
    rss_per_stream_kb: float
    conns_before: int
    conns_open: int
    conns_after: int


async def first_event_times(env: Env, names: Sequence[str]) -> dict[str, list[float]]:
    """Time to first event (ms) on new connections, the targets interleaved sample by sample so
    that a disturbance hits all of them alike."""
    clients = {n: SseClient(env.targets[n].port, token_for(env, n)) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(env.args.sse_samples + 20):  # the first 20 rounds warm up
        for n in [*names[i % len(names) :], *names[: i % len(names)]]:
            dt, w = await asyncio.wait_for(clients[n].open(), 10)
            w.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(w.wait_closed(), 5)
            if i >= 20:
                times[n].append(dt * 1e3)
    return times


async def idle_streams(env: Env, t: Target, times: list[float]) -> SseResult:
    """Open N idle streams: RSS per stream; then close them all and count the upstream
    connections still open 1 s later."""
    client = SseClient(t.port, token_for(env, t.name))

    def count() -> int:
        if t.direct:
            return established(t.pid, local_port=t.port)
        return established(t.pid, remote_port=t.upstream_port)

    before_conns, before_rss = count(), rss_kb(t.pid)
    sem = asyncio.Semaphore(50)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                _, w = await asyncio.wait_for(client.open(), 15)
                writers.append(w)
            except OSError as exc:  # TimeoutError included
                failed += 1
                if failed <= 3:
                    log(f"{t.name}: SSE stream failed: {exc!r}")

    try:
        await asyncio.gather(*(one() for _ in range(env.args.streams)))
        ensure_alive(env, t)
        await asyncio.sleep(1.0)
        open_conns, open_rss = count(), rss_kb(t.pid)
    finally:
        for w in writers:
            w.close()
    await asyncio.sleep(1.0)  # the contract: released within 1 s
    after_conns = count()
    per_stream = (open_rss - before_rss) / len(writers) if writers else float("nan")
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [float("nan")] * 9
    return SseResult(
        t.name, median(times), q[8], len(writers), failed, per_stream, before_conns, open_conns, after_conns
    )


async def sse_all(env: Env, names: Sequence[str]) -> list[SseResult]:
    log(f"SSE: first event, {env.args.sse_samples} samples per target, interleaved")
    times = await first_event_times(env, names)
    await asyncio.sleep(1.5)  # let the sampled streams' upstream connections go away
    results = []
    for n in names:
        log(f"SSE: {env.args.streams} idle streams through {n}")
        results.append(await idle_streams(env, env.targets[n], times[n]))
    return results


def sse_table(env: Env, results: list[SseResult]) -> str:
    direct = next((r for r in results if r.target == "direct"), None)
    lines = [
        f"GET /sse; the upstream sends one event at once, then stays silent. First event: "
        f"{env.args.sse_samples} new connections per target, one at a time, targets interleaved "
        "(connect included). Idle streams: "
        f"{env.args.streams} opened, RSS of the measured process before/after. Upstream connections: "
        "ESTABLISHED sockets of the proxy to the upstream port (direct: the server's own).",
        "",
        "| target | first event p50 ms | p90 ms | added vs direct | streams open (failed) | "
        "RSS per idle stream | upstream conns before / open / 1 s after close |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        added = "-" if direct is None or r is direct else f"{r.ttfe_p50_ms - direct.ttfe_p50_ms:+.2f} ms"
        released = "released" if r.conns_after <= r.conns_before else "NOT released"
        lines.append(
            f"| {r.target} | {r.ttfe_p50_ms:.2f} | {r.ttfe_p90_ms:.2f} | {added} | {r.opened} ({r.failed}) | "
            f"{r.rss_per_stream_kb:.1f} KB | {r.conns_before} / {r.conns_open} / {r.conns_after} "
            f"({released}) |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- profile


def _frame(raw: str) -> tuple[str, str]:
    """`func (path/to/file.py:123)` -> (`func (pkg/file.py)`, `pkg`): no line numbers, no
    machine paths. py-spy names some files (the sidecar's own, some stdlib) without a directory."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", raw)
    if not m:
        return raw, raw
    func, path = m.groups()
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        with contextlib.suppress(ValueError):
            path = str(Path(path).resolve().relative_to(REPO))
        if os.path.isabs(path):
            path = Path(path).name
    if "/" in path:
        pkg = path.split("/", 1)[0]
        pkg = path if pkg in ("sidecar", "admin") else pkg
    else:
        own = [d for d in ("sidecar", "admin") if (REPO / d / path).is_file()]
        path = f"{own[0]}/{path}" if own else path
        pkg = path if own else "stdlib (other)"
    return f"{func} ({path})", pkg


def summarize_profile(path: Path, top: int = 15) -> str:
    self_f: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if not frames or not n.isdigit():
            continue
        count = int(n)
        total += count
        self_f[frames[-1][0]] += count
        self_pkg[frames[-1][1]] += count
        for f in {f for f, _ in frames}:
            incl[f] += count
    if not total:
        return "(no samples)"

    def pct(c: int) -> str:
        return f"{100 * c / total:5.1f}%"

    # Frames on (nearly) every stack are the event loop's own scaffolding: leave them out.
    generic = ("asyncio/", "(toolio-sidecar)", "__main__.py)")
    inclusive = [(f, c) for f, c in incl.most_common() if not any(g in f for g in generic)]
    out = [f"{total} samples of busy CPU.", "", "Self time by package (the sidecar by module):", ""]
    out += [f"- {pct(c)}  {f}" for f, c in self_pkg.most_common(top)]
    out += ["", "Top self time by function:", ""]
    out += [f"- {pct(c)}  {f}" for f, c in self_f.most_common(top)]
    out += ["", "Top inclusive time (event-loop frames left out):", ""]
    out += [f"- {pct(c)}  {f}" for f, c in inclusive[:top]]
    return "\n".join(out)


def profile(env: Env, name: str, body: bytes, headers: dict[str, str], out: Path) -> str:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return "(py-spy not installed: pip install py-spy)"
    t = env.targets[name]
    script = lua_script(env.tmp / "profile.lua", body, {**headers, "Authorization": f"Bearer {token_for(env, name)}"})
    wrk(env, name, script, env.args.connections, 2, measure=False)
    # Blocking sampling (the default) pauses the process briefly per sample: stacks are exact,
    # the throughput while sampled is lower. Shares are what count here. --gil: only the thread
    # running Python code, so idle worker threads (argon2 pool, aiosqlite) don't show up.
    cmd = [spy, "record", "-p", str(t.pid), "-d", f"{env.args.duration:g}", "-r", "100", "-f", "raw", "--gil"]
    cmd += ["-o", str(out)]
    if env.pin:
        cmd = ["taskset", "-c", str(LOAD_CPU), *cmd]
    with open(env.tmp / "py-spy.log", "wb") as spylog:
        proc = subprocess.Popen(cmd, stdout=spylog, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(0.5)
        run = wrk(env, name, script, env.args.connections, env.args.duration)
        proc.wait(timeout=env.args.duration + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
    if not out.exists():
        spy_log = (env.tmp / "py-spy.log").read_text(errors="replace")[-300:]
        return f"(py-spy produced no output: {spy_log})"
    return f"{run.rps:,.0f} rps while sampled (sampling slows it).\n\n" + summarize_profile(out)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    p.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="a PostgreSQL server for the sidecar-pg target ('' to skip)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                   help="a Redis for the sidecar-redis target ('' to skip)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (default 2)")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds, target order rotated each round (default 3; 0: SSE only)"
    )
    p.add_argument("--connections", type=int, default=64, help="wrk connections, trivial upstream (default 64)")
    p.add_argument("--mcp-connections", type=int, default=10, help="wrk connections, MCP server (default 10)")

    p.add_argument("--max-steal", type=float, default=5.0, help="discard rounds with more steal %% (default 5)")
    p.add_argument(
        "--max-other",
        type=float,
        default=10.0,
        help="discard rounds where processes outside the benchmark took more %% of a used CPU (default 10)",
    )
    p.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed run (default 2)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before a run, wait up to this many s for other jobs to leave its CPUs alone (default 30)",
    )
    p.add_argument("--streams", type=int, default=1000, help="idle SSE streams to open (default 1000)")
    p.add_argument("--sse-samples", type=int, default=200, help="first-event samples per target (default 200)")
    p.add_argument("--no-sidecar", action="store_true", help="leave the sidecar out")
    p.add_argument("--no-mcp", action="store_true", help="skip the real MCP SDK server section")
    p.add_argument("--no-sse", action="store_true", help="skip the SSE section")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling niceness of the benchmark's processes; on a shared machine e.g. -5 (root) lets "
        "them preempt other jobs, which slow down meanwhile (default 0)",
    )
    p.add_argument("--profile", metavar="FILE", help="also py-spy the sidecar under load; raw stacks to FILE")
    p.add_argument("--write", action="store_true", help="write the report to bench/RESULTS.md")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    return p.parse_args(argv)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"

    import aiohttp

    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs ({platform.machine()}); "
        f"Python {platform.python_version()}; aiohttp {aiohttp.__version__}; {first_line(['nginx', '-v'])}; "
        f"{first_line(['wrk', '-v']).split(' [')[0]}"
    )


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install -y nginx wrk", file=sys.stderr)
            return 2
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not pin:
        log("fewer than 2 CPUs or no taskset: running unpinned (ratios will be noisier)")
    else:
        os.sched_setaffinity(0, {LOAD_CPU})  # the SSE client runs here, next to wrk
    raise_nofile()
    if args.nice:
        # Inherited by every process started from here on (targets, wrk, py-spy).
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            log(f"--nice {args.nice} not applied: {exc}")
    tmp = Path(tempfile.mkdtemp(prefix="toolio-bench-"))
    procs = Procs(tmp, pin)
    env = Env(args, tmp, procs, pin, token="tak_" + os.urandom(23).hex()[:46])
    sections: list[tuple[str, str]] = []
    try:
        with signals_raise():
            cli = None if args.no_sidecar else sidecar_cli()
            if cli is None and not args.no_sidecar:
                log("sidecar not available (no sidecar/__main__.py or `toolio-sidecar --help` fails): skipped")
            up = start_upstream(env, "direct")
            env.targets["direct"] = up
            if cli:
                env.targets["sidecar"] = start_sidecar(
                    env,
                    cli,
                    "sidecar",
                    up,
                    "toolio-sidecar (valid key, cache hit, signing, metrics, access log)",
                )
                env.token = token_for(env, "sidecar")  # nginx allows the same key
                pg_url = postgres_database(env)
                if pg_url:
                    # The same sidecar on the shared PostgreSQL store: a cache hit must cost the same.
                    env.targets["sidecar-pg"] = start_sidecar(
                        env, cli, "sidecar-pg", up, "toolio-sidecar on the PostgreSQL store (cache hit)",
                        extra=f'\n[store]\nurl = "{pg_url}"\n',
                    )
                # The same sidecar with a tool policy: every body read, the call checked against
                # the key's patterns (the benchmark's tools/call is allowed), its audit event queued.
                env.targets["sidecar-tools"] = start_sidecar(
                    env, cli, "sidecar-tools", up, "toolio-sidecar with tool patterns (10) on the key's role",
                    role='tools = ["get_*", "search_*", "list_*", "describe_*", "whoami", "add", "echo", '
                         '"plans", "plan_[0-9]*", "report_?"]\n',
                )
                # The same sidecar with a rate limit on the key's role, counted in the process: one
                # GCRA step and two more answer fields per request (never refused at this rate).
                env.targets["sidecar-limited"] = start_sidecar(
                    env, cli, "sidecar-limited", up, "toolio-sidecar, rate-limited key (in memory)",
                    role='rate_limit = "999999999/second"\n',
                )
                if args.redis_url:
                    # ... and counted in Redis: one script run (one round trip) per request.
                    env.targets["sidecar-redis"] = start_sidecar(
                        env, cli, "sidecar-redis", up, "toolio-sidecar, rate-limited key (shared in Redis)",
                        role='rate_limit = "999999999/second"\n',
                        extra=f'\n[limits]\nredis_url = "{args.redis_url}"\n',
                    )
                # The same sidecar signing with HS256: what ES256 (the default) costs per request.
                env.targets["sidecar-hs256"] = start_sidecar(
                    env, cli, "sidecar-hs256", up, "toolio-sidecar, HS256 assertion instead of ES256",
                    extra='\n[signing]\nalgorithm = "HS256"\n',
                )
            env.targets["nginx"] = start_nginx(env, "nginx", up)
            env.targets["bare"] = start_bare(env, "bare", up, "bare aiohttp pass-through proxy")
            names: list[str] = [n for n in ("direct", "nginx", "bare", "sidecar", "sidecar-tools", "sidecar-pg",
                                            "sidecar-limited", "sidecar-redis", "sidecar-hs256")
                                if n in env.targets]
            mcp_names: list[str] = []
            if not args.no_mcp:
                mcp = start_mcp_server(env, "mcp-direct")
                env.targets["mcp-direct"] = mcp
                # nginx in front of the same server: how much of "vs direct" any extra hop costs here.
                env.targets["mcp-nginx"] = start_nginx(env, "mcp-nginx", mcp, "nginx -> MCP server", MCP_HEADERS,
                                                       (BENCH / "mcp_request.json").read_bytes())
                env.targets["mcp-bare"] = start_bare(env, "mcp-bare", mcp, "bare aiohttp proxy -> MCP server")
                if cli:
                    env.targets["mcp-sidecar"] = start_sidecar(
                        env, cli, "mcp-sidecar", mcp, "toolio-sidecar -> MCP server"
                    )
                mcp_names = [n for n in ("mcp-direct", "mcp-nginx", "mcp-bare", "mcp-sidecar") if n in env.targets]
            log(f"targets up: {', '.join(env.targets)}; temp dir {tmp.name}")

            rounds: list[Round] = []
            if args.rounds > 0:
                rounds = run_rounds(env, names, TRIVIAL_BODY, JSON_HEADERS, args.connections)
                table = throughput_table(env, rounds, names, args.connections)
                sections.append(("Throughput vs nginx and the bare proxy", table))
            mcp_rounds: list[Round] = []
            if mcp_names and args.rounds > 0:
                body = (BENCH / "mcp_request.json").read_bytes()

                mcp_rounds = run_rounds(env, mcp_names, body, MCP_HEADERS, args.mcp_connections)
                sections.append(("In front of the real MCP SDK server", mcp_table(env, mcp_rounds, mcp_names)))
            if not args.no_sse:
                sections.append(("SSE streams", sse_table(env, asyncio.run(sse_all(env, names)))))
            if args.profile and "sidecar" in env.targets:
                log("profiling the sidecar with py-spy")
                summary = profile(env, "sidecar", TRIVIAL_BODY, JSON_HEADERS, Path(args.profile))
                sections.append(("py-spy profile of the sidecar under load (64 connections)", summary))
            if rounds:
                detail = rounds_detail(rounds) + ("\n\n" + rounds_detail(mcp_rounds) if mcp_rounds else "")
                sections.append(("Per-round detail (in the order run)", detail))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        for cleanup in env.cleanups:
            cleanup()
        if args.keep_tmp:
            log(f"kept temp dir: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # No machine paths in the report: absolute arguments are shown by their file name.
    shown = [Path(x).name if os.path.isabs(x) else x for x in (argv if argv is not None else sys.argv[1:])]
    cmd = " ".join(["python bench/run.py", *shown])
    report = [
        "# toolio-sidecar benchmark results",
        "",
        f"`{cmd}` — {versions()}.",
        f"wrk and upstreams on CPU {LOAD_CPU}, the proxy under test alone on CPU {PROXY_CPU}"
        + ("" if pin else " (NOT pinned on this machine)")
        + ". Ratios are paired within a round, then the median over kept rounds.",
    ]
    for title, body_text in sections:
        report += ["", f"## {title}", "", body_text]
    text = "\n".join(report) + "\n"
    print(text)
    if args.write:
        (BENCH / "RESULTS.md").write_text(text)
        log("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
