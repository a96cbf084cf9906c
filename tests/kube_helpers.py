"""Helpers for tests that talk to a real cluster (the dev cluster, or $KUBECONFIG with
FTO_USE_EXISTING_CLUSTER=1). The fixtures that hand out a `Cluster` live in tests/conftest.py."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hack import nodeagent
from hack.kube import Api, Kube
from hack.kube import KubectlError as KubectlError  # re-exported: tests catch it from here
from hack.nodeagent.agent import RunningContainer, agent_dir, running_containers
from hack.operator_process import OperatorProcess as OperatorProcess  # re-exported, as below
from hack.operator_process import http_ok as http_ok
from hack.operator_process import terminate as terminate
from hack.operator_process import wait_for as wait_for

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

# kwok ends a Running pod that carries this annotation (hack/kwok/pod-exit.yaml).
EXIT_CODE_ANNOTATION = "kwok.finetune.dev/exit-code"


@dataclass(frozen=True)
class Cluster:
    """The cluster under test: kubectl and the REST client of hack/kube.py (shared with the demo and the
    node agent)."""

    kubeconfig: Path
    bin_dir: Path

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @functools.cached_property
    def kube(self) -> Kube:
        return Kube(self.kubeconfig, self.kubectl_path)

    @property
    def api(self) -> Api:
        return self.kube.api

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raise KubectlError on a non-zero exit when `check`."""
        return self.kube.kubectl(*args, check=check, input=input, timeout=timeout)

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
        """Create or update objects (server-side apply) from Python dicts."""
        self.kube.apply(manifest, namespace)


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    """`kubectl ARGS -o json`, parsed."""
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def get_pod(cluster: Cluster, namespace: str, pod: str) -> dict[str, Any]:
    result: dict[str, Any] = kubectl_json(cluster, "get", "pod", pod, "-n", namespace)
    return result


def wait_for_pod_phase(
    cluster: Cluster, namespace: str, pod: str, phase: str, timeout: float = 60.0
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = get_pod(cluster, namespace, pod)
        return last if last.get("status", {}).get("phase") == phase else None

    try:
        return wait_for(reached, timeout, f"pod {namespace}/{pod} to be {phase}")
    except AssertionError as err:
        raise AssertionError(
            f"{err}; it is {last.get('status', {}).get('phase')}: {last.get('status')}"
        ) from None


def finish_pod(
    cluster: Cluster, namespace: str, pod: str, exit_code: int, timeout: float = 60.0
) -> dict[str, Any]:
    """End a pod on a kwok node as if its containers exited with `exit_code`, and return the pod.

    0 -> phase Succeeded (containers terminated, reason Completed); anything else -> phase Failed with
    containerStatuses[*].state.terminated.exitCode == exit_code (reason Error). The pod must be scheduled
    on a kwok node; kwok acts once it is Running.
    """
    if not 0 <= exit_code <= 255:
        raise ValueError(f"exit_code must be 0..255, got {exit_code}")
    cluster.kubectl(
        "annotate", "pod", pod, "-n", namespace, "--overwrite", f"{EXIT_CODE_ANNOTATION}={exit_code}"
    )
    return wait_for_pod_phase(cluster, namespace, pod, "Succeeded" if exit_code == 0 else "Failed", timeout)


def cannot_run_pods(reason: str) -> NoReturn:
    """A test that needs real pods cannot run here: under CI=true that is a failure, locally a skip."""
    import pytest

    message = f"cannot run pods on this machine: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class LocalNode:
    """The dev cluster's local node (hack/nodeagent): pods placed there run as processes on this machine."""

    name: str
    root: Path  # the dev cluster's folder

    @staticmethod
    def placement() -> dict[str, Any]:
        """What a pod spec needs to be placed on the local node."""
        return {"nodeSelector": dict(nodeagent.NODE_SELECTOR), "tolerations": [dict(nodeagent.TOLERATION)]}

    def containers(self) -> list[RunningContainer]:
        return running_containers(self.root)

    def service_address(self, namespace: str, service: str, port: str, timeout: float = 60.0) -> str:
        """`http://127.0.0.1:PORT`: the loopback forwarder of a Service port (what
        `python -m hack.devcluster services` prints)."""
        path = agent_dir(self.root) / "services.json"
        key = f"{namespace}/{service}:{port}"

        def published() -> str | None:
            try:
                host, number = json.loads(path.read_text())[key]
            except (OSError, ValueError, KeyError):
                return None
            return f"http://{host}:{number}"

        return wait_for(published, timeout, f"a forwarder for Service port {key}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET on loopback (no proxy): (status, body); (0, error) when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:
        return 0, str(err)
