"""Raw-socket attack tests against a running sidecar: framing, limits, faults, brute force, sessions, fuzzing."""
