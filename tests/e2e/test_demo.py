"""`make demo` works: hack/demo.py against the test session's cluster, in its own namespace."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube_helpers import Cluster, kubectl_json

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("local_node")]


def test_demo_trains_the_example_job_to_success(cluster: Cluster, crds: list[str], tmp_path: Path) -> None:
    namespace = f"t-demo-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "FTO_USE_EXISTING_CLUSTER": "1",
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # this cluster's kubectl
        "FTO_DEMO_NAMESPACE": namespace,
        "FTO_DEMO_DIR": str(tmp_path),
    }
    try:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "hack" / "demo.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        job = kubectl_json(cluster, "get", "finetunejob", "demo", "-n", namespace)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert f"FineTuneJob {namespace}/demo: Succeeded" in out
        metrics = job["status"]["metrics"]
        assert metrics["after"]["loss"] < metrics["before"]["loss"]
        assert "loss curve: " in out
        assert "the node agent runs its trainer container here" in out
    finally:
        # The demo leaves its job for you to look at; its operator is gone, so drop the finalizer first.
        for name in cluster.kubectl("get", "ftj", "-n", namespace, "-o", "name", check=False).stdout.split():
            cluster.kubectl(
                "patch",
                name,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
