"""The admin listener's key-management API and page (builds on the sidecar package)."""
