"""The dev cluster behaves like a real cluster where the operator relies on it: scheduling by GPU requests,
garbage collection, RBAC with service-account tokens, volumes, admission, and pod endings driven by tests."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hack import devcluster
from hack.nodeagent.agent import running_containers
from hack.nodeagent.init import old_pod_runner_active
from hack.nodeagent.network import ClusterNetwork

from tests.kube_helpers import (
    Cluster,
    KubectlError,
    LocalNode,
    OperatorProcess,
    cannot_run_pods,
    finish_pod,
    get_pod,
    kubectl_json,
    wait_for,
    wait_for_pod_phase,
)

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
EXISTING_CLUSTER = os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1"


def pod(name: str, gpus: int = 0, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox:1.36", "command": ["sleep", "infinity"]}
    if gpus:
        container["resources"] = {"limits": {GPU: str(gpus)}}
    body: dict[str, Any] = {"containers": [container], "restartPolicy": "Never", **spec}
    if gpus:
        body["tolerations"] = [GPU_TOLERATION]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": body}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def gpu_nodes(cluster: Cluster) -> list[dict[str, Any]]:
    nodes = kubectl_json(cluster, "get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    return list(nodes)


# ------------------------------------------------------------------------------------------ nodes


def test_gpu_nodes_show_allocatable_gpus(cluster: Cluster) -> None:
    nodes = gpu_nodes(cluster)
    assert nodes, "no node labelled nvidia.com/gpu.present=true"
    if not EXISTING_CLUSTER:
        count, gpus = os.environ.get("FTO_DEV_GPU_NODES", "2x8").split("x")
        assert sorted(n["metadata"]["name"] for n in nodes) == [f"gpu-node-{i}" for i in range(int(count))]
        assert {n["status"]["allocatable"][GPU] for n in nodes} == {gpus}
    for node in nodes:
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": GPU, "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        assert (condition(node, "Ready") or {}).get("status") == "True"
    # What a person sees: `kubectl get nodes` with the GPU column.
    table = cluster.kubectl(
        "get", "nodes", "-o", r"custom-columns=NAME:.metadata.name,GPU:.status.allocatable.nvidia\.com/gpu"
    ).stdout
    rows = dict(line.split() for line in table.splitlines()[1:])
    for node in nodes:
        assert rows[node["metadata"]["name"]] == node["status"]["allocatable"][GPU]
    cpu_node = kubectl_json(cluster, "get", "node", "cpu-node-0")
    assert GPU not in cpu_node["status"]["allocatable"]
    assert not cpu_node["spec"].get("taints")


# ------------------------------------------------------------------------------------------ scheduling


def test_gpu_pod_is_placed_and_runs_while_an_oversized_one_is_unschedulable(
    cluster: Cluster, namespace: str
) -> None:
    per_node = max(int(n["status"]["allocatable"][GPU]) for n in gpu_nodes(cluster))
    cluster.apply([pod("fits", gpus=4), pod("too-big", gpus=per_node + 1)], namespace)

    running = wait_for_pod_phase(cluster, namespace, "fits", "Running")
    assert running["spec"]["nodeName"] in {n["metadata"]["name"] for n in gpu_nodes(cluster)}
    assert running["status"].get("podIP"), "kwok gives running pods an IP"
    assert all(s["ready"] for s in running["status"]["containerStatuses"])

    def unschedulable() -> dict[str, Any] | None:
        scheduled = condition(get_pod(cluster, namespace, "too-big"), "PodScheduled")
        return scheduled if scheduled and scheduled["status"] == "False" else None

    scheduled = wait_for(unschedulable, 60, "PodScheduled=False on the oversized pod")
    assert scheduled["reason"] == "Unschedulable"
    assert f"Insufficient {GPU}" in scheduled["message"]
    assert get_pod(cluster, namespace, "too-big")["status"]["phase"] == "Pending"


def test_gpu_pod_without_toleration_avoids_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    untolerated = pod("no-toleration", gpus=1)
    del untolerated["spec"]["tolerations"]
    cluster.apply([untolerated, pod("cpu-only")], namespace)
    assert wait_for_pod_phase(cluster, namespace, "cpu-only", "Running")["spec"]["nodeName"] == "cpu-node-0"

    def pending_reason() -> str | None:
        scheduled = condition(get_pod(cluster, namespace, "no-toleration"), "PodScheduled")
        return scheduled["message"] if scheduled and scheduled["status"] == "False" else None

    assert "untolerated taint" in wait_for(pending_reason, 60, "the GPU taint to keep the pod off GPU nodes")


# ------------------------------------------------------------------------------------------ pod endings


def test_finish_pod_drives_pods_to_succeeded_and_failed(cluster: Cluster, namespace: str) -> None:
    cluster.apply([pod("ok"), pod("bad")], namespace)
    for name in ("ok", "bad"):
        wait_for_pod_phase(cluster, namespace, name, "Running")

    ok = finish_pod(cluster, namespace, "ok", 0)
    bad = finish_pod(cluster, namespace, "bad", 3)

    assert ok["status"]["phase"] == "Succeeded"
    assert bad["status"]["phase"] == "Failed"
    for finished, code, reason in ((ok, 0, "Completed"), (bad, 3, "Error")):
        (status,) = finished["status"]["containerStatuses"]
        assert list(status["state"]) == ["terminated"]
        assert status["state"]["terminated"]["exitCode"] == code
        assert status["state"]["terminated"]["reason"] == reason
        assert condition(finished, "Ready")["status"] == "False"  # type: ignore[index]


def test_pods_stay_running_until_told_to_finish(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train"},
        "spec": {"backoffLimit": 0, "template": {"spec": pod("unused", gpus=2)["spec"]}},
    }
    cluster.apply(job, namespace)
    pod_name = wait_for(
        lambda: cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "job-name=train", "-o", "name"
        ).stdout.strip(),
        60,
        "the Job's pod",
    ).removeprefix("pod/")
    wait_for_pod_phase(cluster, namespace, pod_name, "Running")
    # A later event on the pod must not end it either (kwok's stock pod-complete stage would).
    cluster.kubectl("label", "pod", pod_name, "-n", namespace, "touched=yes")
    wait_for(
        lambda: get_pod(cluster, namespace, pod_name)["metadata"]["labels"].get("touched") == "yes",
        30,
        "the label",
    )
    assert get_pod(cluster, namespace, pod_name)["status"]["phase"] == "Running"
    assert not kubectl_json(cluster, "get", "job", "train", "-n", namespace)["status"].get("succeeded")

    finish_pod(cluster, namespace, pod_name, 0)

    def job_complete() -> bool:
        status = kubectl_json(cluster, "get", "job", "train", "-n", namespace)
        return (condition(status, "Complete") or {}).get("status") == "True"

    wait_for(job_complete, 60, "the Job to be Complete after its pod succeeded")


# ------------------------------------------------------------------------------------------ controllers


def test_job_is_garbage_collected_when_its_owner_is_deleted(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=k=v")
    owner = kubectl_json(cluster, "get", "configmap", "owner", "-n", namespace)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
            ],
        },
        "spec": {"template": {"spec": pod("unused")["spec"]}},
    }
    cluster.apply(job, namespace)
    wait_for(
        lambda: cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=owned", "-o", "name").stdout,
        60,
        "the Job controller to create the pod",
    )

    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_for(
        lambda: cluster.kubectl("get", "job", "owned", "-n", namespace, check=False).returncode != 0,
        60,
        "the garbage collector to delete the Job",
    )
    err = cluster.kubectl("get", "job", "owned", "-n", namespace, check=False).stderr
    assert "NotFound" in err
    wait_for(
        lambda: (
            not cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=owned", "-o", "name").stdout
        ),
        60,
        "the Job's pods to be deleted with it",
    )


# ------------------------------------------------------------------------------------------ RBAC


def _api_get(cluster: Cluster, path: str, token: str) -> int:
    """GET with only a bearer token (no client certificate), returning the HTTP status."""
    config = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    server = config["clusters"][0]["cluster"]
    context = ssl.create_default_context()
    if "certificate-authority-data" in server:
        context.load_verify_locations(cadata=base64.b64decode(server["certificate-authority-data"]).decode())
    elif "certificate-authority" in server:
        context.load_verify_locations(cafile=server["certificate-authority"])
    request = urllib.request.Request(server["server"] + path, headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_rbac_is_enforced_for_a_service_account(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "role", "cm-reader", "--verb=get", "--resource=configmaps", "-n", namespace)
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=cm-reader",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    cluster.kubectl("create", "configmap", "visible", "-n", namespace, "--from-literal=k=v")
    cluster.kubectl("create", "secret", "generic", "hidden", "-n", namespace, "--from-literal=k=v")
    who = f"--as=system:serviceaccount:{namespace}:reader"

    allowed = cluster.kubectl("auth", "can-i", "get", "configmaps", who, "-n", namespace, check=False)
    denied = cluster.kubectl("auth", "can-i", "get", "secrets", who, "-n", namespace, check=False)
    assert (allowed.returncode, allowed.stdout.strip()) == (0, "yes")
    assert (denied.returncode, denied.stdout.strip()) == (1, "no")

    token = cluster.kubectl("create", "token", "reader", "-n", namespace, "--duration=10m").stdout.strip()
    assert _api_get(cluster, f"/api/v1/namespaces/{namespace}/configmaps/visible", token) == 200
    assert _api_get(cluster, f"/api/v1/namespaces/{namespace}/secrets/hidden", token) == 403
    assert _api_get(cluster, f"/api/v1/namespaces/{namespace}/secrets/hidden", "not-a-token") == 401


# ------------------------------------------------------------------------------------------ volumes


def pvc(name: str, size: str = "1Gi") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


@pytest.mark.skipif(EXISTING_CLUSTER, reason="standard-wffc is a dev-cluster StorageClass")
def test_a_wait_for_first_consumer_claim_binds_only_once_a_pod_uses_it(
    cluster: Cluster, namespace: str
) -> None:
    claim = pvc("later")
    claim["spec"]["storageClassName"] = "standard-wffc"
    cluster.apply(claim, namespace)
    user = pod("consumer", volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "later"}}])
    user["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]

    def phase() -> str:
        return str(kubectl_json(cluster, "get", "pvc", "later", "-n", namespace)["status"].get("phase"))

    # No consumer yet: the provisioner leaves it alone (the PV controller waits for the scheduler too).
    wait_for(
        lambda: "WaitForFirstConsumer" in cluster.kubectl("describe", "pvc", "later", "-n", namespace).stdout,
        30,
        "the WaitForFirstConsumer event",
    )
    assert phase() == "Pending"
    cluster.apply(user, namespace)
    node = wait_for_pod_phase(cluster, namespace, "consumer", "Running")["spec"]["nodeName"]
    bound = kubectl_json(cluster, "get", "pvc", "later", "-n", namespace)
    assert bound["status"]["phase"] == "Bound"
    assert bound["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == node


def test_pvc_binds_and_a_pod_using_it_runs(cluster: Cluster, namespace: str) -> None:
    cluster.apply(pvc("data", "2Gi"), namespace)

    def bound() -> dict[str, Any] | None:
        claim: dict[str, Any] = kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)
        return claim if claim.get("status", {}).get("phase") == "Bound" else None

    claim = wait_for(bound, 60, "the claim to be Bound")
    assert claim["spec"]["storageClassName"] == "standard"  # the default StorageClass
    volume = kubectl_json(cluster, "get", "pv", claim["spec"]["volumeName"])
    assert volume["spec"]["capacity"]["storage"] == "2Gi"
    assert volume["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]
    if not EXISTING_CLUSTER:
        assert Path(volume["spec"]["hostPath"]["path"]).is_dir()

    user = pod("user", volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}])
    user["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    cluster.apply(user, namespace)
    assert wait_for_pod_phase(cluster, namespace, "user", "Running")["spec"]["nodeName"]

    if EXISTING_CLUSTER:
        return
    # Deleting the claim releases the volume; the provisioner deletes it and its folder.
    cluster.kubectl("delete", "pod", "user", "-n", namespace, "--wait=true", "--timeout=60s")
    cluster.kubectl("delete", "pvc", "data", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: cluster.kubectl("get", "pv", volume["metadata"]["name"], check=False).returncode != 0,
        60,
        "the released volume to be deleted",
    )
    assert not Path(volume["spec"]["hostPath"]["path"]).exists()


def test_many_claims_bind(cluster: Cluster, namespace: str) -> None:
    names = [f"claim-{i}" for i in range(32)]
    cluster.apply([pvc(n, "100Mi") for n in names], namespace)

    def all_bound() -> bool:
        claims = kubectl_json(cluster, "get", "pvc", "-n", namespace)["items"]
        return sorted(c["metadata"]["name"] for c in claims if c["status"].get("phase") == "Bound") == sorted(
            names
        )

    wait_for(all_bound, 120, "32 claims to be Bound")


# ------------------------------------------------------------------------------------------ admission


def test_pod_security_admission_enforces_namespace_level(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    privileged = pod("privileged")
    privileged["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(KubectlError) as refused:
        cluster.apply(privileged, namespace)
    assert 'violates PodSecurity "restricted:latest"' in refused.value.stderr
    assert "privileged" in refused.value.stderr


@pytest.fixture
def webhook_server() -> Iterator[tuple[int, bytes]]:
    """An HTTPS validating webhook on 127.0.0.1 that denies pods labelled deny=yes. Yields (port, CA PEM)."""
    ca = devcluster.issue_certificate("test-webhook-ca", days=1)
    cert, key = devcluster.issue_certificate(
        "127.0.0.1", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=["127.0.0.1"], days=1
    )
    cert_pem = devcluster.pem(cert)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request = review["request"]
            labels = request["object"]["metadata"].get("labels") or {}
            allowed = labels.get("deny") != "yes"
            response: dict[str, Any] = {"uid": request["uid"], "allowed": allowed}
            if not allowed:
                response["status"] = {"code": 403, "message": "denied by the test webhook on 127.0.0.1"}
            body = json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tls.crt").write_bytes(cert_pem)
        (Path(tmp) / "tls.key").write_bytes(devcluster.pem(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(Path(tmp) / "tls.crt", Path(tmp) / "tls.key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), devcluster.pem(ca[0])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(EXISTING_CLUSTER, reason="an apiserver in a container cannot reach this host's 127.0.0.1")
def test_admission_webhook_on_localhost_is_called(
    cluster: Cluster, namespace: str, webhook_server: tuple[int, bytes]
) -> None:
    port, ca_pem = webhook_server
    config_name = f"{namespace}-deny"
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": config_name},
        "webhooks": [
            {
                "name": "deny.test.finetune.dev",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/validate",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
            }
        ],
    }
    cluster.apply(webhook)
    try:
        denied = pod("denied")
        denied["metadata"]["labels"] = {"deny": "yes"}

        def refused() -> str | None:
            try:
                cluster.apply(denied, namespace)
            except KubectlError as err:
                return str(err.stderr)
            cluster.kubectl("delete", "pod", "denied", "-n", namespace, "--wait=false")
            return None  # the webhook configuration was not active yet

        assert "denied by the test webhook on 127.0.0.1" in wait_for(
            refused, 30, "the webhook to deny the pod"
        )
        cluster.apply(pod("allowed"), namespace)
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", config_name, "--ignore-not-found")


# ------------------------------------------------------------------------------------------ fixtures


def test_operator_fixture_runs_stops_and_restarts_the_operator(operator: OperatorProcess) -> None:
    assert operator.running
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(operator.metrics_url, timeout=10) as resp:
        assert resp.status == 200
    operator.kill()
    assert not operator.running
    operator.start()
    assert operator.running
    assert operator.stop() is not None
    assert not operator.running
    assert operator.logs()


# ------------------------------------------------------------------------------------------ up / down


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and devcluster.process_start_ticks(int(entry.name)) is not None:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(EXISTING_CLUSTER, reason="starts a second dev cluster of its own")
def test_up_is_idempotent_and_down_leaves_no_process(tmp_path: Path) -> None:
    env = dict(os.environ, FTO_DEV_DIR=str(tmp_path / "cluster"), FTO_DEV_GPU_NODES="1x2")

    def devcluster_cli(*args: str) -> str:
        result = subprocess.run(
            devcluster.command(*args),
            cwd=devcluster.REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    root = (tmp_path / "cluster").resolve()
    network = ClusterNetwork.for_dev_dir(root, devcluster.SERVICE_CIDR)
    host_links, host_routes = _host_links(), _host_routes(network.subnet)
    try:
        assert "dev cluster ready" in devcluster_cli("up")
        first = devcluster.State.load(devcluster.Layout(root))
        assert first is not None
        if not first.local_node:
            cannot_run_pods(first.no_local_node)
        assert [p.name for p in first.processes] == [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "local-provisioner",
            "node-agent",
        ]
        assert all(p.alive() for p in first.processes)

        assert "already running" in devcluster_cli("up")
        again = devcluster.State.load(devcluster.Layout(root))
        assert again is not None
        assert [p.pid for p in again.processes] == [p.pid for p in first.processes]

        # Something for `down` to clean up: a running pod of the local node, with a memory volume and a
        # mount point made on this machine, behind a Service (a forwarder).
        kube = Cluster(root / "kubeconfig", Path(first.bin_dir))
        spec = {
            **LocalNode.placement(),
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sleep", "300"],
                    "volumeMounts": [{"name": "shm", "mountPath": f"/tmp/fto-down-test-{os.getpid()}"}],
                }
            ],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
        }
        kube.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "sleeper", "labels": {"a": "b"}},
                    "spec": spec,
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "sleeper"},
                    "spec": {"selector": {"a": "b"}, "ports": [{"port": 80}]},
                },
            ],
            "default",
        )
        kube.kubectl("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s")
        assert network.owned_netns() == [network.node_netns, network.pod_netns(1)]
        assert any(line.startswith(f"unreachable {network.subnet}") for line in _host_routes())
        assert running_containers(root)
        uid = kubectl_json(kube, "get", "pod", "sleeper")["metadata"]["uid"]
        assert Path(f"/dev/shm/fto-{uid}-shm").is_dir()
    finally:
        devcluster_cli("down")
    assert not any(p.alive() for p in first.processes)
    assert _processes_mentioning(str(tmp_path)) == []
    assert network.owned_netns() == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert network.node_netns not in mounts
    assert str(root) not in mounts
    if not old_pod_runner_active():  # an older checkout's pod runner keeps every mount point it may use
        assert not Path(f"/tmp/fto-down-test-{os.getpid()}").exists()
    assert not Path(f"/dev/shm/fto-{uid}-shm").exists()
    assert _host_links() == host_links  # every interface it made lived in its own namespaces
    assert _host_routes(network.subnet) == host_routes


def _host_routes(own_subnet: object = None) -> list[str]:
    """The host's routes; with ``own_subnet``, without other dev clusters' `unreachable` routes (another
    session on this machine may start or stop its cluster meanwhile)."""
    lines = subprocess.run(
        ["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if own_subnet is None:
        return lines
    return [line for line in lines if not line.startswith("unreachable ") or str(own_subnet) in line]


def test_the_gateway_keeps_its_mac_while_pods_come_and_go(tmp_path: Path) -> None:
    """A bridge without a MAC of its own takes its lowest port's and changes it when that port goes; the other
    pods' ARP entry for the gateway then leads nowhere and their connections (to the API server, to Services)
    stall until it expires. Pods of the local node come and go all the time, so the gateway's MAC is fixed."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        cannot_run_pods("network namespaces need root and `ip`")
    network = ClusterNetwork.for_dev_dir(tmp_path / "cluster", devcluster.SERVICE_CIDR)

    def gateway_mac() -> str:
        out = subprocess.run(
            ["ip", "-n", network.node_netns, "-j", "link", "show", "br0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return str(json.loads(out)[0]["address"])

    try:
        network.ensure_node()
        assert gateway_mac() == network.bridge_mac
        for slot in (1, 2, 3):
            network.add_pod(slot)
            assert gateway_mac() == network.bridge_mac, f"after pod {slot} came"
        for slot in (1, 2):
            network.remove_pod(slot)
            assert gateway_mac() == network.bridge_mac, f"after pod {slot} went"
    finally:
        network.teardown()
    assert network.owned_netns() == []


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}
