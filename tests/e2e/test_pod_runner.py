"""hack/pod_runner.py runs a pod's container for real, with the pod's environment, volumes and identity, and
ends the pod with the real exit code."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hack import pod_runner

from tests.kube_helpers import Cluster, get_pod, kubectl_json, wait_for, wait_for_pod_phase

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(pod_runner.cannot_run_pods() is not None, reason=str(pod_runner.cannot_run_pods())),
]

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# Runs inside the pod: report what the container sees, write to the volume, use the pod's identity.
SCRIPT = r"""
import json, os, socket, sys
from pathlib import Path
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

config.load_incluster_config()
core = client.CoreV1Api()
ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text()
allowed = core.read_namespaced_config_map("settings", ns).data["greeting"]
try:
    core.list_namespaced_secret(ns)
    secrets = "allowed"
except ApiException as exc:
    secrets = exc.status
Path("/data/out.txt").write_text("written by " + os.environ["POD_NAME"])
Path("/dev/termination-log").write_text("bye from the pod")
report = {
    "env": {k: os.environ.get(k) for k in ("GREETING", "PASSWORD", "POD_NAME", "POD_NAMESPACE", "INDEX",
                                            "PLAIN", "EXPANDED", "HOSTNAME", "KUBERNETES_SERVICE_HOST")},
    "leaked": "FTO_HOST_ONLY" in os.environ,
    "file": Path("/etc/demo/file.txt").read_text(),
    "sub_path": Path("/data/conf/copy.txt").read_text(),
    "scratch": os.access("/scratch", os.W_OK),
    "config_read_only": not os.access("/etc/demo", os.W_OK),
    "hostname": socket.gethostname(),
    "resolves": socket.gethostbyname("runner-0.sub"),
    "api_configmap": allowed,
    "api_secrets": secrets,
    "python": sys.executable,
}
print("REPORT " + json.dumps(report), flush=True)
sys.exit(3)
"""


def manifests(namespace: str) -> list[dict[str, Any]]:
    role_rules = [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["settings"], "verbs": ["get"]}
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"greeting": "hello", "file.txt": "from a configmap\n"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"password": "s3cret"},
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "runner"},
            "rules": role_rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "runner"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "runner"},
            "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    ]


def pod_manifest() -> dict[str, Any]:
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": "INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
        },
        {"name": "PLAIN", "value": "plain value"},
        {"name": "EXPANDED", "value": "$(POD_NAME)-x $$(POD_NAME)"},
    ]
    container = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": ["python", "-c", SCRIPT],
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/demo", "readOnly": True},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "data", "mountPath": "/data"},
            # A single file (subPath), inside another volume's mount.
            {"name": "config", "mountPath": "/data/conf/copy.txt", "subPath": "file.txt", "readOnly": True},
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runner-0", "annotations": {COMPLETION_INDEX: "0"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "runner",
            "hostname": "runner-0",
            "subdomain": "sub",
            "nodeSelector": {"kubernetes.io/hostname": "cpu-node-0"},
            "containers": [container],
            "volumes": [
                {
                    "name": "config",
                    "configMap": {"name": "settings", "items": [{"key": "file.txt", "path": "file.txt"}]},
                },
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            ],
        },
    }


def test_runs_the_pods_command_with_its_environment_volumes_and_identity(
    cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTO_HOST_ONLY", "1")  # the host's environment must not leak into the container
    cluster.apply(manifests(namespace), namespace)
    wait_for(
        lambda: (
            kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)["status"].get("phase") == "Bound"
        ),
        60,
        "the claim to be bound",
    )
    cluster.apply(pod_manifest(), namespace)
    wait_for_pod_phase(cluster, namespace, "runner-0", "Running")

    kube = pod_runner.Kube(kubectl=cluster.kubectl_path, kubeconfig=cluster.kubeconfig)
    run = pod_runner.run_pod(kube, namespace, "runner-0", log_path=tmp_path / "pod.log")

    assert run.exit_code == 3, run.log()
    line = next((x for x in run.log().splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, run.log()
    report = json.loads(line.removeprefix("REPORT "))
    host, _ = kube.api_server()
    assert report["env"] == {
        "GREETING": "hello",
        "PASSWORD": "s3cret",
        "POD_NAME": "runner-0",
        "POD_NAMESPACE": namespace,
        "INDEX": "0",
        "PLAIN": "plain value",
        "EXPANDED": "runner-0-x $(POD_NAME)",
        "HOSTNAME": "runner-0",
        "KUBERNETES_SERVICE_HOST": host,
    }
    assert report["leaked"] is False
    assert report["file"] == "from a configmap\n"
    assert report["sub_path"] == "from a configmap\n"
    assert report["scratch"] is True
    assert report["config_read_only"] is True
    assert report["hostname"] == "runner-0"
    assert report["resolves"] == "127.0.0.1"
    # The pod's own ServiceAccount: what its Role allows works, the rest is refused.
    assert report["api_configmap"] == "hello"
    assert report["api_secrets"] == 403
    assert report["python"] == str(pod_runner.VENV_PYTHON)
    assert run.termination_message == "bye from the pod"

    pvc = kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)
    pv = kubectl_json(cluster, "get", "pv", pvc["spec"]["volumeName"])
    assert (Path(pv["spec"]["hostPath"]["path"]) / "out.txt").read_text() == "written by runner-0"

    pod = get_pod(cluster, namespace, "runner-0")
    assert pod["metadata"]["annotations"][pod_runner.TERMINATION_MESSAGE_ANNOTATION] == "bye from the pod"
    assert pod["status"]["phase"] == "Failed"
    [status] = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 3
    # Mount points made for the run are gone again; the host's /etc/hosts is untouched.
    assert not Path("/etc/demo").exists()
    assert "runner-0" not in Path("/etc/hosts").read_text()


GRACEFUL = r"""
import signal, sys, time
from pathlib import Path

def stop(signum, frame):
    Path("/data/stopped").write_text("SIGTERM")
    sys.exit(7)

signal.signal(signal.SIGTERM, stop)
print("READY", flush=True)
time.sleep(300)
"""


def test_deleting_the_pod_stops_the_process_with_sigterm(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster.apply(manifests(namespace), namespace)
    wait_for(
        lambda: (
            kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)["status"].get("phase") == "Bound"
        ),
        60,
        "the claim to be bound",
    )
    body = pod_manifest()
    container = body["spec"]["containers"][0]
    container["command"] = ["python", "-c", GRACEFUL]
    container["env"] = []
    cluster.apply(body, namespace)
    wait_for_pod_phase(cluster, namespace, "runner-0", "Running")

    kube = pod_runner.Kube(kubectl=cluster.kubectl_path, kubeconfig=cluster.kubeconfig)
    log = tmp_path / "pod.log"
    runs: list[pod_runner.PodRun] = []
    runner = threading.Thread(
        target=lambda: runs.append(pod_runner.run_pod(kube, namespace, "runner-0", log_path=log))
    )
    runner.start()
    wait_for(lambda: log.exists() and "READY" in log.read_text(), 60, "the process to start")
    cluster.kubectl("delete", "pod", "runner-0", "-n", namespace, "--wait=false")
    runner.join(120)
    assert not runner.is_alive()
    [run] = runs
    assert run.deleted
    assert run.exit_code == 7, run.log()
    pvc = kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)
    pv = kubectl_json(cluster, "get", "pv", pvc["spec"]["volumeName"])
    assert (Path(pv["spec"]["hostPath"]["path"]) / "stopped").read_text() == "SIGTERM"
