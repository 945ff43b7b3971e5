"""Tests of sidecar/gate: who may pass (authentication, cache, limits) and how often."""
