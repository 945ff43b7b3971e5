"""toolio-sidecar: API-key auth sidecar for Toolio's MCP server."""
