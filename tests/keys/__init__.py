"""Tests of sidecar/keys: key format, stores, durability, and key changes reaching a running sidecar."""
