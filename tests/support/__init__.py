"""The test harness, one of each (see each module's docstring):

* ``harness``: ONE way to run a sidecar in the test's process (``running_sidecar``);
* ``processes``: the CLI and ``serve`` as real processes (``run_cli``, ``Deployment``, ``serving``);
* ``config``: settings and config files (``ConfigFactory``);
* ``upstreams``: ONE recording upstream (``RecordingUpstream``, its ``echo`` behaviour) and the
  example MCP server;
* ``raw``: ONE raw HTTP/1.1 client (``exchange``, ``raw_request``, ``parse_responses``);
* ``polling``: ``eventually`` instead of fixed sleeps;
* ``metrics``: metric reads that fail when a sample is missing;
* ``admin``: the admin API's client view of a running sidecar; ``mcp``: an MCP client;
* ``attack``: forged tokens, leak checks, an attacker process; ``postgres``: a real PostgreSQL.
"""
