"""The node agent: registers the local node and runs every pod bound to it, in the spirit of virtual-kubelet
(a node whose containers are local processes).

It watches the pods bound to its node, the Services and the EndpointSlices; gives each pod a worker
(podworker.py); keeps the node's Lease and Ready condition current (node.py); serves container logs to the
API server (logs.py); and forwards Services (forward.py). On SIGTERM (`make cluster-down`) it stops its pods'
processes (SIGTERM, at most STOP_GRACE_S, SIGKILL) and removes their namespaces; if it is killed instead, the
pods keep running and the next agent adopts them (podworker.py).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.kube import Api, ApiError
from hack.nodeagent import node as node_mod
from hack.nodeagent.containers import ContainerRun
from hack.nodeagent.forward import Forwarders
from hack.nodeagent.logs import LogServer, LogStore
from hack.nodeagent.network import ClusterNetwork, NodeSockets, ip
from hack.nodeagent.podworker import PodRecord, PodWorker
from hack.nodeagent.status import timestamp

STOP_GRACE_S = 5.0
Key = tuple[str, str]


def agent_dir(root: Path) -> Path:
    return root / "node"


class Informer:
    """List, then watch, one collection; keeps the objects by (namespace, name); calls `changed` on news."""

    def __init__(self, api: Api, path: str, changed: Callable[[], None], **params: str) -> None:
        self.api, self.path, self.changed, self.params = api, path, changed, params
        self.items: dict[Key, dict[str, Any]] = {}
        self.synced = threading.Event()
        threading.Thread(target=self._run, name=f"watch-{path}", daemon=True).start()

    @staticmethod
    def key(obj: Mapping[str, Any]) -> Key:
        return str(obj["metadata"].get("namespace", "")), str(obj["metadata"]["name"])

    def get(self, key: Key) -> dict[str, Any] | None:
        return self.items.get(key)

    def _run(self) -> None:
        while True:
            try:
                listing = self.api.list(self.path, **self.params)
                version = listing["metadata"]["resourceVersion"]
                self.items = {self.key(o): o for o in listing["items"]}
                self.synced.set()
                self.changed()
                while True:
                    for event in self.api.watch(self.path, version, self.params):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError("WATCH", self.path, int(obj.get("code", 0)), obj)
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            self.items.pop(self.key(obj), None)
                        else:
                            self.items[self.key(obj)] = obj
                        self.changed()
            except Exception:  # a dropped or expired watch: list again
                time.sleep(1.0)


class Agent:
    def __init__(
        self, root: Path, api: Api, node_name: str, gpus: int, service_cidr: str, ca_dir: Path
    ) -> None:
        self.root, self.api, self.node_name, self.gpus = root, api, node_name, gpus
        self.dir = agent_dir(root)
        self.pods_dir = self.dir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.logs = LogStore(self.dir / "logs")
        self.network = ClusterNetwork.for_dev_dir(root, service_cidr)
        self.host_ip = "127.0.0.1"
        self.ca_dir = ca_dir
        url = urllib.parse.urlsplit(api.base_url)
        self.api_address = (url.hostname or "127.0.0.1", url.port or 443)
        self.api_service = (str(self.network.service_cidr[1]), 443)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def log(self, message: str) -> None:
        print(f"[node-agent {time.strftime('%H:%M:%S')}] {message}", flush=True)

    # ------------------------------------------------------------------------------------- run

    def run(self) -> None:
        self.network.ensure_node()
        self.sockets = NodeSockets(self.network.netns_path(self.network.node_netns))
        cert, key = self._serving_certificate()
        self.log_server = LogServer(self.logs, cert, key, self._running)
        self.heartbeat = node_mod.NodeHeartbeat(
            self.api, self.node_name, self.gpus, self.log_server.port, self.host_ip
        )
        self.heartbeat.register()
        threading.Thread(target=self.heartbeat.run, name="heartbeat", daemon=True).start()
        self.forwarders = Forwarders(
            self.sockets, self.network.subnet, self.api_address, self.dir / "services.json"
        )
        self.pods = Informer(
            self.api, "/api/v1/pods", self.wake.set, fieldSelector=f"spec.nodeName={self.node_name}"
        )
        self.services = Informer(self.api, "/api/v1/services", self.wake.set)
        self.slices = Informer(self.api, "/apis/discovery.k8s.io/v1/endpointslices", self.wake.set)
        for informer in (self.pods, self.services, self.slices):
            informer.synced.wait(60)
        self._adopt()
        self.log(
            f"node {self.node_name} ready: pods in {self.network.subnet} "
            f"(namespaces {self.network.node_netns}*), logs on 127.0.0.1:{self.log_server.port}"
        )
        while not self.stopping.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            self._sync_pods()
            self.forwarders.sync(list(self.services.items.values()), list(self.slices.items.values()))
        self.log("stopping: ending the pods' processes")
        self.forwarders.close()
        teardown(self.root, str(self.network.service_cidr), log=self.log)

    def _serving_certificate(self) -> tuple[Path, Path]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID
        from hack.devcluster.pki import issue_certificate, pem

        ca_cert = x509.load_pem_x509_certificate((self.ca_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((self.ca_dir / "ca.key").read_bytes(), password=None)
        cert, key = issue_certificate(
            "system:node:" + self.node_name,
            issuer=(ca_cert, ca_key),  # type: ignore[arg-type]
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=["127.0.0.1", "localhost", self.node_name],
        )
        cert_path, key_path = self.dir / "kubelet.crt", self.dir / "kubelet.key"
        cert_path.write_bytes(pem(cert))
        key_path.touch(mode=0o600)
        key_path.write_bytes(pem(key))
        return cert_path, key_path

    def _running(self, namespace: str, name: str, container: str) -> bool:
        pod = self.pods.get((namespace, name))
        if pod is None:
            return False
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        return any(s["name"] == container and "running" in s.get("state", {}) for s in statuses)

    # ------------------------------------------------------------------------------------- pods

    def _adopt(self) -> None:
        """Pods an earlier agent ran: resume those that still exist, end those that are gone."""
        live = {p["metadata"]["uid"] for p in self.pods.items.values()}
        self.logs.keep_only(live)  # pods deleted while no agent ran (or by an older agent that kept logs)
        for folder in sorted(self.pods_dir.iterdir()):
            record = PodRecord.load(folder)
            if record is not None and record.uid in live:
                if record.finished:
                    self.finished.add(record.uid)
                continue
            self.log(f"pod {folder.name} is gone: ending what is left of it")
            _end_pod_folder(folder, self.network, STOP_GRACE_S)
            if record is not None:
                self.logs.remove(
                    {"metadata": {"namespace": record.namespace, "name": record.name, "uid": record.uid}}
                )

    def _sync_pods(self) -> None:
        live_uids = set()
        for pod in list(self.pods.items.values()):
            uid = pod["metadata"]["uid"]
            live_uids.add(uid)
            with self.lock:
                if uid in self.workers or uid in self.finished:
                    continue
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed") and not (self.pods_dir / uid).exists():
                    continue  # ended before this agent knew it: nothing to run
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
            worker.start()
        for uid in list(self.finished - live_uids):
            # A pod that had ended is gone (the API server deletes terminal pods at once): so are its logs.
            self.finished.discard(uid)
            record = PodRecord.load(self.pods_dir / uid)
            if record is not None:
                meta = {"namespace": record.namespace, "name": record.name, "uid": uid}
                self.logs.remove({"metadata": meta})
            shutil.rmtree(self.pods_dir / uid, ignore_errors=True)
        for worker in list(self.workers.values()):
            worker.wake.set()

    def worker_done(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
            if (self.pods_dir / worker.uid).exists():
                self.finished.add(worker.uid)
        self.wake.set()

    def allocate_slot(self, uid: str) -> int:
        with self.lock:
            used = set()
            for folder in self.pods_dir.iterdir():
                record = PodRecord.load(folder)
                if record is not None and not record.finished:
                    used.add(record.slot)
            slot = next(s for s in range(1, self.network.max_slot + 1) if s not in used)
            placeholder = PodRecord("", "", uid, slot, "")
            placeholder.save(self.pods_dir / uid)
            return slot

    def event(self, pod: Mapping[str, Any], reason: str, message: str, warning: bool = False) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": timestamp(),
            "lastTimestamp": timestamp(),
            "count": 1,
        }
        with contextlib.suppress(ApiError, OSError):
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)


# ----------------------------------------------------------------------------------------- teardown


def _end_pod_folder(folder: Path, network: ClusterNetwork, grace: float) -> None:
    """Stop the recorded runs of a pod folder (only processes whose start time matches the record), remove
    its namespace, memory volumes and folder."""
    for run_json in folder.glob("containers/*/run/run.json"):
        run = ContainerRun.adopt(run_json.parent)
        if run is not None:
            if run.alive():
                run.stop(grace)
            run.cleanup_mount_points()
    record = PodRecord.load(folder)
    if record is not None and record.slot:
        network.remove_pod(record.slot)
    for path in glob.glob(f"/dev/shm/fto-{folder.name}-*"):
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def teardown(root: Path, service_cidr: str, log: Callable[[str], None] = print) -> list[str]:
    """Everything the local node made for the dev cluster in `root`: its pods' processes, mount points,
    memory volumes, and its network namespaces (with every interface in them). Returns the namespaces
    removed."""
    network = ClusterNetwork.for_dev_dir(root, service_cidr)
    pods_dir = agent_dir(root) / "pods"
    for folder in sorted(pods_dir.iterdir()) if pods_dir.is_dir() else []:
        _end_pod_folder(folder, network, STOP_GRACE_S)
    removed = network.teardown()
    if removed:
        log(f"removed network namespaces {', '.join(removed)}")
    return removed


@functools.cache
def cannot_run_pods() -> str | None:
    """Why this machine cannot run the local node's pods (None: it can). Root alone is not enough in some
    containers, so the namespaces are tried once."""
    if os.geteuid() != 0:
        return (
            "the node agent needs root: pods get their own network, mount, UTS and PID namespaces "
            "(run as root, e.g. in the dev container or CI)"
        )
    for tool in ("unshare", "nsenter", "ip"):
        if not shutil.which(tool):
            return f"`{tool}` is needed to run pods (util-linux / iproute2)"
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--pid", "--net", "--fork", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"this machine refuses private mount/UTS/PID/network namespaces: {probe.stderr.strip()}"
    name = f"fto-probe-{os.getpid()}"
    result = ip("netns", "add", name, check=False)
    ip("netns", "del", name, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is refused here: {result.stderr.strip()}"
    return None


def main_run(root: Path, node_name: str, gpus: int, service_cidr: str) -> int:
    api = Api.from_kubeconfig(root / "kubeconfig")
    agent = Agent(root, api, node_name, gpus, service_cidr, root / "pki")
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.run()
    return 0


@dataclass(frozen=True)
class RunningContainer:
    namespace: str
    pod: str
    uid: str
    container: str
    main_pid: int | None
    init_pids: tuple[int, ...]
    """Every container init (PID 1) on this machine that runs this container's plan: exactly one, always."""


def running_containers(root: Path) -> list[RunningContainer]:
    """The containers the local node of the dev cluster in `root` runs now, from its records and /proc."""
    plans: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 4 and argv[-3].endswith(b"init.py") and b"unshare" not in argv[0]:
            plans.setdefault(argv[-2].decode(), []).append(int(proc.name))
    found = []
    for run_json in sorted((agent_dir(root) / "pods").glob("*/containers/*/run/run.json")):
        run = ContainerRun.adopt(run_json.parent)
        record = PodRecord.load(run_json.parents[3])
        if run is None or record is None or not run.alive():
            continue
        found.append(
            RunningContainer(
                record.namespace,
                record.name,
                record.uid,
                run_json.parents[1].name,
                run.main_pid(),
                tuple(sorted(plans.get(str(run_json.parent / "plan.json"), []))),
            )
        )
    return found
