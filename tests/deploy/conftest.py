"""Fixtures of the deployment tests: ``chart``, the Helm chart loaded once per module."""

from tests.support.helm import chart

__all__ = ["chart"]
