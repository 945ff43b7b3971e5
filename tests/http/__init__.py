"""Tests of sidecar/http: the public HTTP/1.1 listener and the pooled upstream client."""
