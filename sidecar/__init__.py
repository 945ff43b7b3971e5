"""toolio-sidecar: API-key auth sidecar for Toolio's MCP server."""

from importlib import metadata

try:
    # The installed distribution's version (pyproject.toml): one place to change it.
    __version__ = metadata.version("toolio-sidecar")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
