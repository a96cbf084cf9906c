"""Fixtures for the trainer's tests: the dev-cluster ones (tests/conftest.py), an S3-compatible server, and
a trained artifact for the server tests."""

from tests.conftest import cluster, crds, namespace, pytest_runtest_makereport
from tests.s3_server import s3_server

from server_fixtures import trained_artifact

__all__ = ["cluster", "crds", "namespace", "pytest_runtest_makereport", "s3_server", "trained_artifact"]
