"""A real S3-compatible server (moto's) for tests of s3:// sources and outputs: a pytest fixture."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from hack import devcluster

from tests.kube_helpers import http_ok, terminate, wait_for


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3-compatible HTTP server (moto's), with credentials and endpoint taken from the environment
    the way the trainer pod gets them (AWS_* variables from a Secret)."""
    import s3fs

    port = devcluster.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, "moto server exited"
            return http_ok(f"{endpoint}/moto-api/", timeout=1)

        wait_for(up, 60, "the moto server to answer", interval=0.2)
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        # fsspec caches filesystem instances: one made for an earlier server would keep its endpoint.
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        terminate(proc, 10)
