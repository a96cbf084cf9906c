"""Fixtures for the trainer's tests: the dev-cluster ones (tests/conftest.py) and an S3-compatible server."""

from tests.conftest import cluster, crds, namespace, pytest_runtest_makereport
from tests.s3_server import s3_server

__all__ = ["cluster", "crds", "namespace", "pytest_runtest_makereport", "s3_server"]
