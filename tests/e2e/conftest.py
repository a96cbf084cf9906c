"""Fixtures of the end-to-end tests that need the operator inside the pod network.

- `operator_pod` (module): a namespace of its own in which the Helm chart runs the operator as a pod on the
  dev cluster's local node (tests/operator_pod.py), watching that namespace; the module's tests put their
  resources there. At the end our resources are deleted while the operator runs, the release is
  uninstalled and the namespace deleted.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tests.kube_helpers import Cluster, LocalNode, wait_for
from tests.operator_pod import OperatorPod, installed_operator_pod


@pytest.fixture(scope="module")
def operator_pod(
    cluster: Cluster,
    crds: list[str],
    local_node: LocalNode,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorPod]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.rsplit(".", 1)[-1].lower())[:30].strip("-")
    namespace = f"t-{slug}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    # Restricted Pod Security: the operator pod, trainer and server pods of the whole path must meet it.
    restricted = "pod-security.kubernetes.io/enforce=restricted"
    cluster.kubectl("label", "namespace", namespace, "finetune.dev/test=true", restricted)
    wait_for(
        lambda: (
            cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0
        ),
        60,
        f"ServiceAccount {namespace}/default",
    )
    failed_before = request.session.testsfailed
    try:
        with installed_operator_pod(
            cluster, namespace, [namespace], tmp_path_factory.mktemp("operator-pod")
        ) as pod:
            try:
                yield pod
            finally:
                if request.session.testsfailed > failed_before:
                    print(f"----- operator pod log ({namespace}) -----\n{pod.logs()}")
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
        cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false", check=False)
        wait_for(
            lambda: not cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip(),
            120,
            f"the pods of namespace {namespace} to be gone",
        )
