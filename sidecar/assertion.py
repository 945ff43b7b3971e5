"""The public verifier for upstream MCP servers written in Python: ``from sidecar.assertion
import verify`` (docs/reference/headers.md, Signed assertion). A stable import path for code
outside this project; the signing side lives in :mod:`sidecar.proxy.assertion`."""

from __future__ import annotations

from sidecar.proxy.assertion import TYP, verify

__all__ = ["TYP", "verify"]
