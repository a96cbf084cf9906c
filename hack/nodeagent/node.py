"""The local node: its Node object (capacity, address, the kubelet endpoint), Ready condition and Lease.

Which pods land here is a choice the pod makes: the node carries the taint `finetune.dev/local-node=true:
NoSchedule` and the label `finetune.dev/node=local`, so a pod runs here only with the matching toleration and
node selector (examples/ use them; see docs/dev-cluster.md). The fake GPU nodes stay kwok's.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from hack.kube import MERGE_PATCH, Api, ApiError
from hack.nodeagent.status import timestamp

NODE_LABEL = ("finetune.dev/node", "local")
TAINT = {"key": "finetune.dev/local-node", "value": "true", "effect": "NoSchedule"}
#: What a pod spec needs to be run by the agent.
TOLERATION = {"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
NODE_SELECTOR = {NODE_LABEL[0]: NODE_LABEL[1]}
GPU_RESOURCE = "nvidia.com/gpu"
LEASE_S = 40
RENEW_S = 10.0
STATUS_S = 30.0


def memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def node_manifest(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                NODE_LABEL[0]: NODE_LABEL[1],
            },
        },
        "spec": {"taints": [dict(TAINT)]},
    }


def node_status(gpus: int, kubelet_port: int, host_ip: str) -> dict[str, Any]:
    """Capacity as this machine has it (CPU, memory), plus `gpus` fake GPUs; limits are not enforced."""
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_bytes() // 1024}Ki", "pods": "110"}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
    now = timestamp()

    def condition(kind: str, value: str, reason: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": value,
            "reason": reason,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }

    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "addresses": [{"type": "InternalIP", "address": host_ip}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "osImage": platform.platform(),
            "kernelVersion": platform.release(),
            "kubeletVersion": "v1.36.3-fto-nodeagent",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "local://processes",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            condition("Ready", "True", "KubeletReady"),
        ],
    }


class NodeHeartbeat:
    """Registers the node, then renews its Lease and its Ready condition until stopped."""

    def __init__(self, api: Api, name: str, gpus: int, kubelet_port: int, host_ip: str) -> None:
        self.api, self.name, self.gpus, self.port, self.host_ip = api, name, gpus, kubelet_port, host_ip
        self.stop = threading.Event()

    def register(self) -> None:
        self.api.create_or_update("/api/v1/nodes", node_manifest(self.name, self.gpus))
        self._status()
        self._lease()

    def _status(self) -> None:
        self.api.patch(
            f"/api/v1/nodes/{self.name}/status",
            {"status": node_status(self.gpus, self.port, self.host_ip)},
            "application/strategic-merge-patch+json",
        )

    def _lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_S, "renewTime": _micro_time()}
        if self.api.patch(path, {"spec": spec}, MERGE_PATCH) is None:
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name},
                    "spec": spec,
                },
            )

    def run(self) -> None:
        last_status = time.monotonic()
        while not self.stop.wait(RENEW_S):
            try:
                self._lease()
                if time.monotonic() - last_status > STATUS_S:
                    self._status()
                    last_status = time.monotonic()
            except (ApiError, OSError):
                continue


def _micro_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
