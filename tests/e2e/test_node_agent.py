"""The local node (hack/nodeagent) runs every pod bound to it as real processes: each pod with its own IP in
its own network namespace, its environment, volumes and ServiceAccount, probes, restarts with backoff, logs
for `kubectl logs`, deletion with the grace period, Services reachable through the dev cluster's
forwarders, and an agent that can be killed and restarted without a second process for any container.

The pods of the whole module are created at once (one namespace) so that their waits (the crash-loop
backoff above all) overlap; each test then checks one behaviour."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hack import devcluster
from hack.nodeagent.agent import agent_dir
from hack.nodeagent.init import old_pod_runner_active
from hack.nodeagent.podenv import VENV_PYTHON

from tests.kube_helpers import (
    Cluster,
    LocalNode,
    get_pod,
    http_get,
    kubectl_json,
    wait_for,
    wait_for_pod_phase,
)

pytestmark = [pytest.mark.e2e]

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TEAM = "example.com/team"
STUBBORN_GRACE_S = 2
# From `kubectl delete` to the pod object's removal, beyond the grace period: kubectl itself, the watch event
# reaching the agent, SIGTERM/SIGKILL and reaping, tearing down the sandbox, the final DELETE and our poll.
# Measured on the shared 2-core dev machine (load average 8): the stubborn pod gone 0.25 s after its grace
# period, the graceful one 0.33 s after the delete; the slack allows about ten times that.
DELETE_SLACK_S = 3.0

# A small HTTP server: answers with its pod's IP; /ready fails while /signals/<pod>.unready exists;
# /healthz fails LIVE_FOR seconds after the start when that is set.
WEB = r"""
import http.server, os, pathlib, time
NAME, IP, START = os.environ["POD_NAME"], os.environ["POD_IP"], time.monotonic()
LIVE_FOR = float(os.environ.get("LIVE_FOR", "0"))
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        code = 200
        if self.path == "/ready" and pathlib.Path(f"/signals/{NAME}.unready").exists():
            code = 503
        if self.path == "/healthz" and LIVE_FOR and time.monotonic() - START > LIVE_FOR:
            code = 500
        body = IP.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
print(f"serving on {IP}:8080", flush=True)
http.server.ThreadingHTTPServer(("", 8080), Handler).serve_forever()
"""

# Runs inside the pod: report what the container sees, write to the volume, use the pod's identity.
REPORT = r"""
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
def web_answer():
    # This pod starts with the web Deployment: its Service answers once a replica is ready.
    import time, urllib.request
    deadline = time.monotonic() + 90
    while True:
        try:
            url = f"http://{os.environ['WEB_SERVICE_IP']}/"
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
Path("/data/out.txt").write_text("written by " + os.environ["POD_NAME"])
Path("/dev/termination-log").write_text("bye from the pod")
report = {
    "env": {k: os.environ.get(k) for k in ("GREETING", "PASSWORD", "POD_NAME", "POD_NAMESPACE", "INDEX",
                                            "PLAIN", "EXPANDED", "HOSTNAME", "KUBERNETES_SERVICE_HOST",
                                            "POD_IP")},
    "leaked": "FTO_HOST_ONLY" in os.environ,
    "file": Path("/etc/demo/file.txt").read_text(),
    "sub_path": Path("/data/conf/copy.txt").read_text(),
    "init": Path("/scratch/init.txt").read_text(),
    "config_read_only": not os.access("/etc/demo", os.W_OK),
    "hostname": socket.gethostname(),
    "resolves": socket.gethostbyname("runner-0.sub"),
    "api_configmap": allowed,
    "api_secrets": secrets,
    "python": sys.executable,
    "web": web_answer(),
}
print("REPORT " + json.dumps(report), flush=True)
sys.exit(3)
"""

GRACEFUL = r"""
import signal, sys, time, os
from pathlib import Path

def stop(signum, frame):
    Path(f"/signals/{os.environ['POD_NAME']}.stopped").write_text("SIGTERM")
    sys.exit(7)

signal.signal(signal.SIGTERM, stop if os.environ.get("GRACEFUL") else signal.SIG_IGN)
print("READY", flush=True)
time.sleep(300)
"""


def container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *extra.pop("env", []),
    ]
    return {
        "name": name,
        "image": "python:3.11-slim",
        "command": ["python", "-c", script],
        "env": env,
        **extra,
    }


def pod(name: str, containers: list[dict[str, Any]], signals: Path, **spec: Any) -> dict[str, Any]:
    volumes = [{"name": "signals", "hostPath": {"path": str(signals), "type": "Directory"}}]
    for c in containers:
        c.setdefault("volumeMounts", []).append({"name": "signals", "mountPath": "/signals"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"test": name}},
        "spec": {
            **LocalNode.placement(),
            "containers": containers,
            **spec,
            "volumes": volumes + spec.get("volumes", []),
        },
    }


def web_deployment(signals: Path) -> dict[str, Any]:
    server = container(
        "web",
        WEB,
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    )
    template = pod("web", [server], signals, terminationGracePeriodSeconds=5)
    template = {"metadata": {"labels": {"app": "web"}}, "spec": template["spec"]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": template},
    }


def identity_objects(namespace: str) -> list[dict[str, Any]]:
    rules = [
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
            "rules": rules,
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
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    ]


def identity_pod(signals: Path, web_ip: str) -> dict[str, Any]:
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": "INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}},
        },
        {"name": "PLAIN", "value": "plain value"},
        {"name": "EXPANDED", "value": "$(POD_NAME)-x $$(POD_NAME)"},
        {"name": "WEB_SERVICE_IP", "value": web_ip},
    ]
    main = container(
        "main",
        REPORT,
        env=env,
        volumeMounts=[
            {"name": "config", "mountPath": "/etc/demo", "readOnly": True},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "data", "mountPath": "/data"},
            # A single file (subPath), inside another volume's mount.
            {"name": "config", "mountPath": "/data/conf/copy.txt", "subPath": "file.txt", "readOnly": True},
        ],
    )
    init = {
        "name": "prepare",
        "image": "busybox",
        "command": ["sh", "-c", "echo from the init container > /scratch/init.txt"],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }
    body = pod(
        "runner-0",
        [main],
        signals,
        restartPolicy="Never",
        serviceAccountName="runner",
        hostname="runner-0",
        subdomain="sub",
        initContainers=[init],
        volumes=[
            {
                "name": "config",
                "configMap": {"name": "settings", "items": [{"key": "file.txt", "path": "file.txt"}]},
            },
            {"name": "scratch", "emptyDir": {}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        ],
    )
    body["metadata"]["annotations"] = {COMPLETION_INDEX: "0"}
    return body


# Reports what the container sees of envFrom, the secret and downwardAPI volumes and the init containers.
SOURCES = r"""
import json, os, stat
from pathlib import Path
def mode(path):
    return oct(stat.S_IMODE(os.stat(path).st_mode))
report = {
    "env": {k: os.environ.get(k) for k in ("CM_greeting", "CM_file.txt", "password", "greeting")},
    "secret": Path("/etc/creds/password").read_text(),
    "secret_modes": [mode("/etc/creds/password"), mode("/etc/creds/again/password")],
    "secret_again": Path("/etc/creds/again/password").read_text(),
    "downward": {p.name: p.read_text() for p in Path("/etc/podinfo").iterdir() if not p.name.startswith(".")},
    "order": Path("/scratch/order").read_text(),
}
print("REPORT " + json.dumps(report), flush=True)
"""


def sources_pod(signals: Path) -> dict[str, Any]:
    """envFrom a ConfigMap (with a prefix, one key overridden by `env`) and a Secret; a secret volume and a
    downwardAPI volume; two init containers, the second of which checks that the first has run."""
    main = container(
        "main",
        SOURCES,
        envFrom=[
            {"configMapRef": {"name": "settings"}, "prefix": "CM_"},
            {"secretRef": {"name": "creds"}},
        ],
        env=[{"name": "CM_greeting", "value": "from env"}],
        volumeMounts=[
            {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
            {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": True},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
    )
    scratch = [{"name": "scratch", "mountPath": "/scratch"}]
    inits = [
        {"name": "first", "image": "busybox", "command": ["sh", "-c", "echo first >> /scratch/order"]},
        {
            "name": "second",
            "image": "busybox",
            "command": ["sh", "-c", "grep -qx first /scratch/order && echo second >> /scratch/order"],
        },
    ]
    body = pod(
        "sources",
        [main],
        signals,
        restartPolicy="Never",
        initContainers=[{**c, "volumeMounts": scratch} for c in inits],
        volumes=[
            {
                "name": "creds",
                "secret": {
                    "secretName": "creds",
                    "defaultMode": 0o400,
                    "items": [
                        {"key": "password", "path": "password"},
                        {"key": "password", "path": "again/password", "mode": 0o440},
                    ],
                },
            },
            {
                "name": "podinfo",
                "downwardAPI": {
                    "items": [
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {
                            "path": "team",
                            "fieldRef": {"fieldPath": "metadata.annotations['example.com/team']"},
                        },
                    ]
                },
            },
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    body["metadata"]["annotations"] = {TEAM: "node"}
    return body


# Listens on 8081 once /signals/probes.listen exists.
LISTEN_LATER = r"""
import os, socket, time
from pathlib import Path
while not Path("/signals/probes.listen").exists():
    time.sleep(0.2)
server = socket.create_server(("", 8081))
while True:
    server.accept()[0].close()
"""


def sleeper(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", "exec sleep 300"], **extra}


def exec_probe(command: str, **fields: Any) -> dict[str, Any]:
    return {"exec": {"command": ["sh", "-c", command]}, "periodSeconds": 1, **fields}


def probe_pods(signals: Path) -> list[dict[str, Any]]:
    """`probes`: a startup probe (exec) that holds back a liveness probe (exec) that would fail at once, and
    a tcpSocket readiness probe; both wait for a file the test writes. `never-starts`: a startup probe that
    never succeeds."""
    started = "test -f /signals/probes.started"
    slow = sleeper(
        "slow",
        startupProbe=exec_probe(started, failureThreshold=300),
        livenessProbe=exec_probe(started, failureThreshold=1),
    )
    tcp = container(
        "tcp",
        LISTEN_LATER,
        ports=[{"name": "tcp", "containerPort": 8081}],
        readinessProbe={"tcpSocket": {"port": "tcp"}, "periodSeconds": 1, "failureThreshold": 1},
    )
    never = sleeper("main", startupProbe=exec_probe("exit 1", failureThreshold=2))
    return [
        pod("probes", [slow, tcp], signals, terminationGracePeriodSeconds=1),
        pod("never-starts", [never], signals, terminationGracePeriodSeconds=1),
    ]


def on_failure_pod(signals: Path) -> dict[str, Any]:
    """restartPolicy OnFailure: `ok` exits 0 (not restarted), `bad` exits 1 (restarted)."""
    ok = {"name": "ok", "image": "busybox", "command": ["sh", "-c", "exit 0"]}
    bad = {"name": "bad", "image": "busybox", "command": ["sh", "-c", "echo failing; exit 1"]}
    return pod("on-failure", [ok, bad], signals, restartPolicy="OnFailure")


@pytest.fixture(scope="module")
def scene(
    cluster: Cluster, local_node: LocalNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One namespace with every pod of this module, created at once."""
    namespace = f"t-node-agent-{os.urandom(3).hex()}"
    signals = tmp_path_factory.mktemp("signals")
    cluster.kubectl("create", "namespace", namespace)
    wait_for(
        lambda: (
            cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0
        ),
        60,
        "the default ServiceAccount",
    )
    cluster.apply(identity_objects(namespace), namespace)
    web_ip = kubectl_json(cluster, "get", "service", "web", "-n", namespace)["spec"]["clusterIP"]
    crash = container("crash", "print('boom', flush=True); raise SystemExit(3)")
    live = container(
        "live",
        WEB,
        env=[{"name": "LIVE_FOR", "value": "2"}],
        livenessProbe={
            "httpGet": {"path": "/healthz", "port": 8080},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    )
    graceful = container("main", GRACEFUL, env=[{"name": "GRACEFUL", "value": "1"}])
    stubborn = container("main", GRACEFUL)
    cluster.apply(
        [
            web_deployment(signals),
            pod("crash", [crash], signals),
            pod("live", [live], signals),
            pod("graceful", [graceful], signals, terminationGracePeriodSeconds=30),
            pod("stubborn", [stubborn], signals, terminationGracePeriodSeconds=STUBBORN_GRACE_S),
            sources_pod(signals),
            *probe_pods(signals),
            on_failure_pod(signals),
        ],
        namespace,
    )
    wait_for(
        lambda: (
            kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)["status"].get("phase") == "Bound"
        ),
        60,
        "the claim to be bound",
    )
    cluster.apply(identity_pod(signals, web_ip), namespace)
    yield {"namespace": namespace, "signals": signals}
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for(
        lambda: not cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip(),
        120,
        f"the pods of {namespace} to be gone",
    )


def web_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return list(kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", "app=web")["items"])


def slice_addresses(cluster: Cluster, namespace: str) -> set[str]:
    """Addresses of the web Service's ready endpoints, as the real EndpointSlice controller lists them."""
    slices = kubectl_json(
        cluster, "get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=web"
    )["items"]
    return {
        address
        for item in slices
        for endpoint in item.get("endpoints") or []
        if (endpoint.get("conditions") or {}).get("ready")
        for address in endpoint["addresses"]
    }


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_a_deployment_of_three_is_available_with_three_ips_behind_its_service(
    cluster: Cluster, local_node: LocalNode, scene: dict[str, Any]
) -> None:
    namespace = scene["namespace"]
    wait_for(
        lambda: (
            kubectl_json(cluster, "get", "deployment", "web", "-n", namespace)["status"].get(
                "availableReplicas"
            )
            == 3
        ),
        120,
        "the web Deployment to be Available with 3 replicas",
    )
    pods = web_pods(cluster, namespace)
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 3, [p["status"].get("podIP") for p in pods]
    assert all(p["spec"]["nodeName"] == local_node.name for p in pods)
    assert all(p["status"]["podIPs"] == [{"ip": p["status"]["podIP"]}] for p in pods)
    wait_for(lambda: slice_addresses(cluster, namespace) == ips, 60, f"the EndpointSlice to list {ips}")

    # Through the dev cluster's way of reaching a Service: each replica answers on the same port, with its IP.
    url = local_node.service_address(namespace, "web", "http")
    answers = {http_get(url)[1] for _ in range(9)}
    assert answers == ips, answers


def test_a_failing_readiness_probe_takes_the_pod_out_of_the_endpointslice_and_back(
    cluster: Cluster, scene: dict[str, Any]
) -> None:
    namespace, signals = scene["namespace"], scene["signals"]
    wait_for(lambda: len(slice_addresses(cluster, namespace)) == 3, 120, "three ready endpoints")
    target = web_pods(cluster, namespace)[0]
    name, address = target["metadata"]["name"], target["status"]["podIP"]
    flag = signals / f"{name}.unready"
    flag.write_text("")
    try:
        wait_for(
            lambda: address not in slice_addresses(cluster, namespace), 60, f"{address} out of the slice"
        )
        assert not ready(get_pod(cluster, namespace, name))
        assert len(slice_addresses(cluster, namespace)) == 2
        assert get_pod(cluster, namespace, name)["status"]["containerStatuses"][0]["restartCount"] == 0
    finally:
        flag.unlink()
    wait_for(lambda: address in slice_addresses(cluster, namespace), 60, f"{address} back in the slice")
    assert ready(get_pod(cluster, namespace, name))


def test_the_pods_own_environment_volumes_identity_and_init_container(
    cluster: Cluster, scene: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = scene["namespace"]
    final = wait_for_pod_phase(cluster, namespace, "runner-0", "Failed", timeout=120)
    log = cluster.kubectl("logs", "runner-0", "-n", namespace, "-c", "main").stdout
    line = next((x for x in log.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, log
    report = json.loads(line.removeprefix("REPORT "))
    pod_ip = final["status"]["podIP"]
    assert report["env"] == {
        "GREETING": "hello",
        "PASSWORD": "s3cret",
        "POD_NAME": "runner-0",
        "POD_NAMESPACE": namespace,
        "INDEX": "0",
        "PLAIN": "plain value",
        "EXPANDED": "runner-0-x $(POD_NAME)",
        "HOSTNAME": "runner-0",
        "KUBERNETES_SERVICE_HOST": str(ipaddress.ip_network(devcluster.SERVICE_CIDR)[1]),
        "POD_IP": pod_ip,
    }
    assert report["leaked"] is False  # nothing of the agent's environment (e.g. PYTHONPATH, KUBECONFIG)
    assert report["file"] == report["sub_path"] == "from a configmap\n"
    assert report["init"] == "from the init container\n"
    assert report["config_read_only"] is True
    assert report["hostname"] == "runner-0"
    assert report["resolves"] == pod_ip
    # The pod's own ServiceAccount, through the `kubernetes` Service: its Role allows this, not the rest.
    assert report["api_configmap"] == "hello"
    assert report["api_secrets"] == 403
    assert report["python"] == str(VENV_PYTHON)
    # Another pod by its Service's cluster IP, from inside a pod.
    assert report["web"] in {p["status"]["podIP"] for p in web_pods(cluster, namespace)}

    [status] = final["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["message"] == "bye from the pod"
    [init] = final["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    pvc = kubectl_json(cluster, "get", "pvc", "data", "-n", namespace)
    pv = kubectl_json(cluster, "get", "pv", pvc["spec"]["volumeName"])
    assert (Path(pv["spec"]["hostPath"]["path"]) / "out.txt").read_text() == "written by runner-0"
    # Mount points made for the run are gone again (unless an older checkout's pod runner, which cannot say
    # which ones it uses, runs now); the host's /etc/hosts is untouched.
    if not old_pod_runner_active():
        assert not Path("/etc/demo").exists()
    assert "runner-0" not in Path("/etc/hosts").read_text()


def statuses(pod: dict[str, Any], kind: str = "containerStatuses") -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["status"].get(kind) or []}


def report_of(cluster: Cluster, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod once it has succeeded, and the REPORT line its `main` container printed."""
    final = wait_for_pod_phase(cluster, namespace, name, "Succeeded", timeout=120)
    log = cluster.kubectl("logs", name, "-n", namespace, "-c", "main").stdout
    line = next((x for x in log.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, log
    return final, json.loads(line.removeprefix("REPORT "))


def test_env_from_a_configmap_and_a_secret(cluster: Cluster, scene: dict[str, Any]) -> None:
    _, report = report_of(cluster, scene["namespace"], "sources")
    assert report["env"] == {
        "CM_greeting": "from env",  # `env` wins over `envFrom`
        "CM_file.txt": "from a configmap\n",  # every key, with the prefix
        "password": "s3cret",
        "greeting": None,  # only with the prefix
    }


def test_secret_and_downward_api_volumes(cluster: Cluster, scene: dict[str, Any]) -> None:
    _, report = report_of(cluster, scene["namespace"], "sources")
    assert report["secret"] == report["secret_again"] == "s3cret"
    assert report["secret_modes"] == ["0o400", "0o440"]  # defaultMode, and an item's own mode
    assert report["downward"] == {"name": "sources", "labels": 'test="sources"', "team": "node"}


def test_two_init_containers_run_in_order_before_the_main_container(
    cluster: Cluster, scene: dict[str, Any]
) -> None:
    final, report = report_of(cluster, scene["namespace"], "sources")
    assert report["order"] == "first\nsecond\n"  # and `second` found `first`'s line (else it fails the pod)
    inits = final["status"]["initContainerStatuses"]
    assert [c["name"] for c in inits] == ["first", "second"]
    assert [c["state"]["terminated"]["exitCode"] for c in inits] == [0, 0]
    [main] = final["status"]["containerStatuses"]
    first, second = (c["state"]["terminated"] for c in inits)
    # Each one starts once the one before has ended (timestamps are to the second).
    assert _seconds(first["finishedAt"]) <= _seconds(second["startedAt"])
    assert _seconds(second["finishedAt"]) <= _seconds(main["state"]["terminated"]["startedAt"])
    initialized = [c for c in final["status"]["conditions"] if c["type"] == "Initialized"]
    assert initialized[0]["status"] == "True", final["status"]["conditions"]


def test_deleting_a_finished_pod_removes_its_logs(
    cluster: Cluster, local_node: LocalNode, scene: dict[str, Any]
) -> None:
    namespace = scene["namespace"]
    final, _ = report_of(cluster, namespace, "sources")
    logs = agent_dir(local_node.root) / "logs" / f"{namespace}_sources_{final['metadata']['uid']}"
    assert (logs / "main").is_dir()
    cluster.kubectl("delete", "pod", "sources", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: not logs.exists(), 30, f"{logs} to be removed with its pod")


def test_a_startup_probe_holds_back_liveness_and_a_tcp_probe_decides_readiness(
    cluster: Cluster, scene: dict[str, Any]
) -> None:
    namespace, signals = scene["namespace"], scene["signals"]

    def both_running() -> dict[str, Any] | None:
        found = get_pod(cluster, namespace, "probes")
        views = statuses(found)
        return found if len(views) == 2 and all("running" in v["state"] for v in views.values()) else None

    wait_for(both_running, 120, "both containers of `probes` to run")
    # Without the startup probe, the liveness probe (every 1 s, failureThreshold 1) would have restarted
    # `slow` by now.
    time.sleep(3)
    found = get_pod(cluster, namespace, "probes")
    slow, tcp = statuses(found)["slow"], statuses(found)["tcp"]
    assert (slow["started"], slow["ready"], slow["restartCount"]) == (False, False, 0), slow
    assert (tcp["ready"], tcp["restartCount"]) == (False, 0), tcp  # nothing listens on 8081 yet
    assert not ready(found)

    (signals / "probes.started").write_text("")
    (signals / "probes.listen").write_text("")

    def all_ready() -> dict[str, Any] | None:
        found = get_pod(cluster, namespace, "probes")
        return found if ready(found) else None

    found = wait_for(all_ready, 60, "`probes` to be Ready")
    slow, tcp = statuses(found)["slow"], statuses(found)["tcp"]
    assert (slow["started"], slow["ready"], slow["restartCount"]) == (True, True, 0), slow
    assert (tcp["started"], tcp["ready"], tcp["restartCount"]) == (True, True, 0), tcp


def test_a_startup_probe_that_never_succeeds_restarts_the_container(
    cluster: Cluster, scene: dict[str, Any]
) -> None:
    namespace = scene["namespace"]

    def restarted() -> dict[str, Any] | None:
        status = statuses(get_pod(cluster, namespace, "never-starts")).get("main")
        return status if status and status["restartCount"] >= 1 else None

    status = wait_for(restarted, 120, "the startup probe to restart the container")
    assert status["started"] is False
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGTERM, status
    events = kubectl_json(
        cluster, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=never-starts"
    )
    messages = [e["message"] for e in events["items"] if e["reason"] == "Unhealthy"]
    assert any(m.startswith("Startup probe failed") for m in messages), messages


def test_restart_policy_on_failure_restarts_only_the_container_that_failed(
    cluster: Cluster, scene: dict[str, Any]
) -> None:
    namespace = scene["namespace"]

    def bad_restarted() -> dict[str, Any] | None:
        found = get_pod(cluster, namespace, "on-failure")
        bad = statuses(found).get("bad")
        return found if bad and bad["restartCount"] >= 1 else None

    # The crash-loop backoff's first wait is 10 s: by then `ok` would have been restarted under Always.
    found = wait_for(bad_restarted, 120, "the failed container to be restarted")
    ok, bad = statuses(found)["ok"], statuses(found)["bad"]
    assert bad["lastState"]["terminated"]["exitCode"] == 1, bad
    assert ok["restartCount"] == 0, ok
    assert ok["state"]["terminated"]["exitCode"] == 0, ok
    assert ok["state"]["terminated"]["reason"] == "Completed", ok
    assert found["status"]["phase"] == "Running"  # `bad` will run again


def test_a_crashing_container_restarts_with_growing_backoff(cluster: Cluster, scene: dict[str, Any]) -> None:
    namespace = scene["namespace"]
    runs: dict[str, dict[str, Any]] = {}  # every ended run seen, by its start
    reasons: set[str] = set()

    def third_run_ended() -> bool:
        [status] = get_pod(cluster, namespace, "crash")["status"]["containerStatuses"]
        for state in (status["state"], status["lastState"]):
            if "terminated" in state:
                runs[state["terminated"]["startedAt"]] = state["terminated"]
        reasons.update(s["waiting"]["reason"] for s in (status["state"],) if "waiting" in s)
        return len(runs) >= 3

    wait_for(third_run_ended, 150, "three runs of the crashing container", interval=0.25)
    [status] = get_pod(cluster, namespace, "crash")["status"]["containerStatuses"]
    assert status["restartCount"] >= 2
    assert "CrashLoopBackOff" in reasons, reasons
    ended = [runs[k] for k in sorted(runs)]
    assert {r["exitCode"] for r in ended} == {3}
    # The wait before each restart doubles (the kubelet's 10 s, 20 s, ...): the second is the longer one.
    gaps = [_seconds(b["startedAt"]) - _seconds(a["finishedAt"]) for a, b in itertools.pairwise(ended[:3])]
    assert gaps[0] >= 9, gaps
    assert gaps[1] > gaps[0], gaps
    assert "boom" in cluster.kubectl("logs", "crash", "-n", namespace, "--previous").stdout


def _seconds(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def test_a_failing_liveness_probe_restarts_the_container(cluster: Cluster, scene: dict[str, Any]) -> None:
    namespace = scene["namespace"]

    def restarted() -> dict[str, Any] | None:
        [status] = get_pod(cluster, namespace, "live")["status"]["containerStatuses"]
        return status if status["restartCount"] >= 1 else None

    status = wait_for(restarted, 120, "the liveness probe to restart the container")
    # Stopped by the agent (SIGTERM: 128 + 15), not crashed by itself.
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGTERM, status
    events = kubectl_json(
        cluster, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=live"
    )
    assert any(e["reason"] == "Unhealthy" for e in events["items"]), events["items"]


def test_the_agent_killed_and_restarted_leaves_one_process_per_container(
    cluster: Cluster, local_node: LocalNode, scene: dict[str, Any]
) -> None:
    namespace = scene["namespace"]
    wait_for(lambda: len(slice_addresses(cluster, namespace)) == 3, 120, "three ready endpoints")
    before = {(c.pod, c.container): c.main_pid for c in local_node.containers() if c.namespace == namespace}
    assert before[("graceful", "main")] is not None
    layout = devcluster.Layout.default()
    state = devcluster.State.load(layout)
    assert state is not None
    [agent] = [p for p in state.processes if p.name == "node-agent"]
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not agent.alive(), 10, "the agent to die")
    result = cluster.kubectl("version", check=False)  # the cluster itself is unaffected
    assert result.returncode == 0, result.stderr
    subprocess.run(devcluster.command("up"), cwd=devcluster.REPO_ROOT, check=True, capture_output=True)
    time.sleep(3)  # the new agent has adopted the pods (or, if it were wrong, started second copies)
    after = [c for c in local_node.containers() if c.namespace == namespace]
    assert all(len(c.init_pids) == 1 for c in after), after
    survivors = {(c.pod, c.container): c.main_pid for c in after}
    for key in (("graceful", "main"), ("stubborn", "main")):
        assert survivors[key] == before[key], (key, before, survivors)
    web = [c for c in after if c.pod.startswith("web-")]
    assert len(web) == 3
    wait_for(lambda: len(slice_addresses(cluster, namespace)) == 3, 60, "three ready endpoints again")
    assert all(
        s["restartCount"] == 0 for p in web_pods(cluster, namespace) for s in p["status"]["containerStatuses"]
    )


def test_deleting_a_pod_ends_its_processes_within_the_grace_period(
    cluster: Cluster, local_node: LocalNode, scene: dict[str, Any]
) -> None:
    namespace, signals = scene["namespace"], scene["signals"]
    for name in ("graceful", "stubborn"):
        wait_for_pod_phase(cluster, namespace, name, "Running")
        wait_for(lambda n=name: "READY" in cluster.kubectl("logs", n, "-n", namespace).stdout, 60, "READY")
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "graceful", "stubborn", "-n", namespace, "--wait=false")
    gone: dict[str, float] = {}  # seconds from the delete to the pod object's removal (by the agent)

    def both_gone() -> bool:
        for name in ("graceful", "stubborn"):
            if name not in gone and cluster.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}") is None:
                gone[name] = time.monotonic() - began
        return len(gone) == 2

    wait_for(both_gone, 60, "graceful and stubborn to be gone", interval=0.1)
    left = [
        c for c in local_node.containers() if c.namespace == namespace and c.pod in ("graceful", "stubborn")
    ]
    assert not left, left
    assert (signals / "graceful.stopped").read_text() == "SIGTERM"  # it got SIGTERM and used it
    assert not (signals / "stubborn.stopped").exists()
    # The stubborn one ignored SIGTERM and was killed after its 2 s grace period; the graceful one ended on
    # SIGTERM, long before its 30 s.
    assert gone["stubborn"] < STUBBORN_GRACE_S + DELETE_SLACK_S, gone
    assert gone["graceful"] < DELETE_SLACK_S, gone
