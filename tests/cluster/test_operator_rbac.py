"""The operator under its own least-privilege identity: the chart's ServiceAccount and ClusterRole, a
token for that ServiceAccount (not the admin kubeconfig), webhooks on. A rule the operator needs and the
chart lacks shows up as a 403 here."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hack import devcluster

from tests.cluster.test_finetunejob import ftj, gpu_pool_free, trainer_pods, wait_phase
from tests.kube_helpers import Cluster, OperatorProcess, finish_pod
from tests.operator_role import render_chart_rbac, service_account_kubeconfig

pytestmark = pytest.mark.cluster


@pytest.fixture(params=["cluster", "namespaced"])
def chart_rbac(
    cluster: Cluster, crds: list[str], namespace: str, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The chart's ServiceAccount and RBAC, applied as the chart renders them: a ClusterRole with every rule
    (rbac.scope cluster), or a Role in the watched namespace plus a ClusterRole for what has no namespace
    (rbac.scope namespaced)."""
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    rendered = render_chart_rbac(cluster, release, namespace, request.param, [namespace])
    cluster.kubectl("apply", "-f", "-", input=rendered)
    yield f"{release}-finetune-operator"
    cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


def test_the_operator_runs_a_job_under_the_charts_role(
    cluster: Cluster, namespace: str, chart_rbac: str, tmp_path: Path
) -> None:
    name = chart_rbac  # the chart's fullname: its webhook configurations' resourceNames allow exactly these
    kubeconfig = tmp_path / "sa.kubeconfig"
    service_account_kubeconfig(cluster, namespace, name, kubeconfig)
    env = {
        "FTO_WEBHOOK_PORT": str(devcluster.free_port()),
        "FTO_WEBHOOK_CONFIGURATION_NAME": name,
        "FTO_WEBHOOK_CERT_DIR": str(tmp_path / "certs"),
    }
    proc = OperatorProcess(namespace, kubeconfig, tmp_path / "operator.log", env=env)
    try:
        proc.start()
        gpu_pool_free(cluster)
        cluster.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=HF_TOKEN=x")
        body = ftj("least", gpus=1)
        body["spec"]["credentialsSecret"] = "creds"
        cluster.apply(body, namespace)
        wait_phase(cluster, namespace, "least", "Running")
        (pod,) = trainer_pods(cluster, namespace, "least", 1)
        finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
        wait_phase(cluster, namespace, "least", "Succeeded")
        missing = ftj("missing", gpus=1)
        missing["spec"]["credentialsSecret"] = "no-such-secret"
        refused = cluster.kubectl(
            "create", "-n", namespace, "-f", "-", input=json.dumps(missing), check=False
        )
        assert "spec.credentialsSecret: Secret 'no-such-secret' not found" in refused.stderr, refused.stderr
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", namespace, "--timeout=60s")
    finally:
        proc.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            cluster.kubectl("delete", kind, name, "--ignore-not-found")
    logs = proc.logs()
    assert not re.search(r"\b403\b", logs), logs[-5000:]  # (\b: not inside a hex digest)
    assert "forbidden" not in logs.lower(), logs[-5000:]
