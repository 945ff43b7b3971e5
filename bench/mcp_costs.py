"""What the MCP step costs per request, in process: reading a JSON-RPC body, checking a call
against tool patterns, and filtering a 100-tool list (JSON and one server-sent event).

    .venv/bin/python bench/mcp_costs.py

Prints microseconds per operation (best of 5 repeats); the throughput cost in front of a real
upstream is measured by bench/run.py (the sidecar-tools target).
"""

from __future__ import annotations

import json
import timeit

from prometheus_client import CollectorRegistry

from sidecar.gate.jsonrpc import parse
from sidecar.gate.tools import ToolPolicy
from sidecar.metrics import Metrics
from sidecar.proxy.mcp import AnswerFilter

CALL = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3},'
        b'"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}')
PATTERNS = ("get_*", "search_*", "list_*", "describe_*", "whoami", "add", "echo", "plans", "plan_[0-9]*", "report_?")
TOOLS = [{"name": f"get_{i}" if i % 4 == 0 else f"tool_{i}", "description": "A tool that does a thing. " * 4,
          "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
         for i in range(100)]
LIST = json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": TOOLS, "nextCursor": "c"}}).encode()
EVENT = b"event: message\ndata: " + LIST + b"\n\n"


def per_op(fn: object, number: int) -> float:
    times = timeit.repeat(fn, number=number, repeat=5)  # type: ignore[arg-type]
    return min(times) / number * 1e6


def main() -> None:
    policy = ToolPolicy(PATTERNS)
    answer_filter = AnswerFilter(policy, Metrics(CollectorRegistry()))
    rows = [
        (f"parse a tools/call body ({len(CALL)} B)", per_op(lambda: parse(CALL), 20000)),
        ("check the tool against 10 patterns", per_op(lambda: policy.allows("add"), 200000)),
        (f"filter a 100-tool list, JSON ({len(LIST) // 1024} KB)", per_op(lambda: policy.filter_json(LIST), 500)),
        ("filter a 100-tool list, one event", per_op(lambda: answer_filter.feed(EVENT), 500)),
        ("pass a JSON answer without a tool list", per_op(lambda: policy.filter_json(CALL), 200000)),
    ]
    for name, micros in rows:
        print(f"{name:<45} {micros:8.1f} µs")


if __name__ == "__main__":
    main()
