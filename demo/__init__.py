"""The demo: an example MCP server (``demo.server``, the ``[demo]`` extra) and the
``toolio-sidecar demo`` command that puts the sidecar in front of it (``demo.command``)."""
