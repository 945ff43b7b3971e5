"""The README's first command: the demo sets everything up and proves a real MCP call."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def test_demo_starts_everything_and_a_real_tool_call_goes_through_the_sidecar() -> None:
    done = subprocess.run([sys.executable, "-m", "sidecar", "demo", "--once", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tools/call add(2, 3) = 5" in out
    assert re.search(r"admin page\s+: http://127\.0\.0\.1:\d+/admin/", out)
    block = json.loads(out[out.index("{"):out.index("\nTry it:")])
    server = block["mcpServers"]["toolio"]
    assert server["url"].endswith("/mcp")
    assert re.fullmatch(r"Bearer tak_[0-9A-Za-z]{46}", server["headers"]["Authorization"])
    # Nothing that looks like a key goes to stderr (logs), only the one-time stdout display.
    assert "tak_" not in done.stderr
