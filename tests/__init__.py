"""The test suite; subpackages mirror the production packages (see tests/support for the harness)."""
