"""Tests of sidecar/proxy: forwarding, headers, identity assertions, MCP end to end."""
