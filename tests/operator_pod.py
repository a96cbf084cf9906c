"""The operator as a pod of the cluster, installed by the real Helm chart (helm/finetune-operator).

On the dev cluster the pod runs on the local node (hack/nodeagent), inside the pod network: it reaches the
server pods' IPs as an operator in any cluster does, with its own ServiceAccount and the chart's RBAC. The
local node has no images: its `python` is this machine's virtualenv, and `PYTHONPATH` points at the
checkout these tests come from, so a clean clone and a worktree each run their own operator.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack import nodeagent

from tests.kube_helpers import REPO_ROOT, Cluster, KubectlError, kubectl_json, wait_for

CHART = REPO_ROOT / "helm" / "finetune-operator"
OUR_KINDS = "finetunejobs.finetune.dev,modeldeployments.finetune.dev"
#: The checkout's packages, as the pod's PYTHONPATH (the editable install may point at another checkout).
CHECKOUT_PATH = ":".join(
    str(p) for p in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image" / "src", REPO_ROOT)
)


@dataclass(frozen=True)
class OperatorPod:
    """A Helm release of the chart whose operator watches `watched`."""

    cluster: Cluster
    release: str
    namespace: str
    """The release's namespace (the operator's pod, ServiceAccount, Services)."""
    watched: tuple[str, ...]

    @property
    def deployment(self) -> str:
        return f"{self.release}-finetune-operator"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.deployment}"

    def logs(self, tail: int = 400) -> str:
        """The operator's log (stderr) and audit records (stdout); `tail=-1` for all of it."""
        result = self.cluster.kubectl(
            "logs", f"deployment/{self.deployment}", "-n", self.namespace, f"--tail={tail}", check=False
        )
        return result.stdout + result.stderr

    def audit_dir(self) -> Path:
        """The folder of the audit claim's PersistentVolume (a hostPath of the local provisioner)."""
        claim = kubectl_json(self.cluster, "get", "pvc", f"{self.deployment}-audit", "-n", self.namespace)
        volume = kubectl_json(self.cluster, "get", "pv", claim["spec"]["volumeName"])
        return Path((volume["spec"].get("hostPath") or volume["spec"]["local"])["path"])

    def pods(self) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={self.release}"
        items: list[dict[str, Any]] = kubectl_json(
            self.cluster, "get", "pods", "-n", self.namespace, "-l", selector
        )["items"]
        return items


def helm(cluster: Cluster, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """The real `helm` of the dev tools against this cluster."""
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def operator_pod_values(watched: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Chart values for an operator on the local node that runs this checkout and watches `watched`.

    Webhooks are off: the API server, on this machine's own network, cannot dial a pod address of the
    local node (docs/dev-cluster.md), and fail-closed webhooks it cannot reach would refuse every object."""
    return {
        "command": ["python", "-m", "finetune_operator"],
        "watchNamespaces": list(watched),
        "webhooks": {"enabled": False},
        "nodeSelector": dict(nodeagent.NODE_SELECTOR),
        "tolerations": [dict(nodeagent.TOLERATION)],
        "env": {"PYTHONPATH": CHECKOUT_PATH, **env},
        # The chart's audit file sink on its own claim: the local provisioner's folder is on this machine,
        # so a test reads the files the operator wrote (OperatorPod.audit_dir).
        "audit": {"persistence": {"enabled": True, "size": "64Mi"}},
    }


@contextlib.contextmanager
def installed_operator_pod(
    cluster: Cluster,
    namespace: str,
    watched: Sequence[str],
    values_dir: Path,
    env: Mapping[str, str] | None = None,
) -> Iterator[OperatorPod]:
    """`helm install` the chart into `namespace`, wait until the operator's pod is healthy (its readiness
    probe is the operator's /healthz) and yield it; at the end delete our resources in the watched
    namespaces while it still runs (its finalizers are honoured), then `helm uninstall`."""
    release = f"fto-{uuid.uuid4().hex[:6]}"
    values = values_dir / f"{release}-values.json"
    values.write_text(json.dumps(operator_pod_values(watched, env or {})), encoding="utf-8")
    pod = OperatorPod(cluster, release, namespace, tuple(watched))
    try:
        out = helm(
            cluster, "install", release, str(CHART), "--namespace", namespace, "-f", str(values),
            "--wait", "--timeout", "180s", timeout=240,
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(
                f"helm install failed: {out.stdout}{out.stderr}\npods: {pod.pods()}\n{pod.logs()}"
            )
        wait_for(
            lambda: any(
                c.get("ready")
                for p in pod.pods()
                for c in (p.get("status") or {}).get("containerStatuses", [])
            ),
            60,
            "the operator pod Ready",
        )
        yield pod
    finally:
        for watched_namespace in watched:
            cluster.kubectl(
                "delete",
                OUR_KINDS,
                "--all",
                "-n",
                watched_namespace,
                "--timeout=90s",
                check=False,
                timeout=120,
            )
        helm(cluster, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
        for watched_namespace in watched:
            left = cluster.kubectl(
                "get", OUR_KINDS, "-n", watched_namespace, "-o", "name", check=False
            ).stdout.split()
            for name in left:  # the operator could not finish them: let the namespace go anyway
                with contextlib.suppress(KubectlError):
                    cluster.kubectl(
                        "patch", name, "-n", watched_namespace, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}',
                    )  # fmt: skip
