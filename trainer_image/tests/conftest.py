"""The dev-cluster fixtures (tests/conftest.py) for the trainer's cluster tests."""

from tests.conftest import cluster, crds, namespace, pytest_runtest_makereport

__all__ = ["cluster", "crds", "namespace", "pytest_runtest_makereport"]
