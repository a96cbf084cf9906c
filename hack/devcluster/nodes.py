"""The fake nodes kwok plays (GPU nodes and a CPU node)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from hack.devcluster.layout import (
    DEFAULT_GPU_NODES,
    GPU_PRODUCT,
    GPU_RESOURCE,
    GPU_TAINT,
    NOT_READY_TAINT,
    fail,
)
from hack.kube import Api


@dataclass(frozen=True)
class NodeShape:
    count: int
    gpus: int

    @classmethod
    def parse(cls, text: str) -> NodeShape:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not match:
            fail(f"FTO_DEV_GPU_NODES={text!r}: expected COUNTxGPUS, e.g. 2x8")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def from_env(cls) -> NodeShape:
        return cls.parse(os.environ.get("FTO_DEV_GPU_NODES", DEFAULT_GPU_NODES))

    def __str__(self) -> str:
        return f"{self.count}x{self.gpus}"


def node_manifest(
    name: str, cpu: str, memory: str, gpus: int, labels: dict[str, str], taints: list[dict[str, str]]
) -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **labels},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def desired_nodes(shape: NodeShape) -> list[dict[str, Any]]:
    gpu_labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": GPU_PRODUCT}
    nodes = [
        node_manifest(f"gpu-node-{i}", "64", "512Gi", shape.gpus, gpu_labels, [dict(GPU_TAINT)])
        for i in range(shape.count)
    ]
    nodes.append(node_manifest("cpu-node-0", "16", "64Gi", 0, {}, []))
    return nodes


def ensure_nodes(api: Api, shape: NodeShape) -> list[str]:
    """Create (or reshape) the fake nodes; remove GPU nodes beyond the wanted count."""
    wanted = desired_nodes(shape)
    for node in wanted:
        api.create_or_update("/api/v1/nodes", node)
    names = [n["metadata"]["name"] for n in wanted]
    status, existing = api.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    if status == 200:
        for item in existing["items"]:
            name = item["metadata"]["name"]
            if name.startswith("gpu-node-") and name not in names:
                api.request("DELETE", f"/api/v1/nodes/{name}")
    return names


def node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    taints = node.get("spec", {}).get("taints", [])
    return ready and not any(t["key"] == NOT_READY_TAINT for t in taints)
