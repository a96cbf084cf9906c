"""Free GPUs per node, from the nodes' allocatable and the requests of the pods bound to them.

GPUs are an extended resource whose name the job chooses (`resources.gpuResourceName`: `nvidia.com/gpu`,
`amd.com/gpu`, a MIG profile such as `nvidia.com/mig-1g.10gb`, ...): capacity is always counted for the
resource the pods will request, never for another. Upstream kinds stay plain dicts (Node, Pod); only the
facts admission needs are extracted here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.common import DEFAULT_GPU_RESOURCE

GPU_RESOURCE = DEFAULT_GPU_RESOURCE
_TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})
_BLOCKING_TAINT_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


@dataclass(frozen=True)
class NodeGpus:
    """One schedulable node as admission sees it, for one GPU resource."""

    name: str
    allocatable: int
    free: int
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    resource: str = GPU_RESOURCE
    """The extended resource counted in `allocatable` and `free`."""
    terminating: int = 0
    """GPUs of pods being deleted here (e.g. preempted, saving a checkpoint): still used, soon free."""


def gpu_count(value: object) -> int:
    """A GPU quantity (`8`, `"8"`) as an int; extended resources are whole numbers."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.endswith("k"):
        return int(text[:-1]) * 1000
    return int(float(text))


def pod_gpu_request(pod: Mapping[str, Any], resource: str = GPU_RESOURCE) -> int:
    """Effective request of `resource` by a pod, as the scheduler counts it: max(sum of containers,
    largest init container)."""
    spec = pod.get("spec") or {}

    def request(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        # Extended resources may be given as limits only; the API server copies them to requests.
        limits = resources.get("limits") or {}
        return gpu_count(requests.get(resource, limits.get(resource)))

    main = sum(request(c) for c in spec.get("containers") or [])
    init = max((request(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


def is_pod_terminated(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in _TERMINATED_PHASES


def _node_ready(node: Mapping[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return True


def free_gpus_by_node(
    nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], resource: str = GPU_RESOURCE
) -> list[NodeGpus]:
    """Allocatable `resource` minus the requests of it by non-terminated pods bound to each ready node;
    nodes without any of it are left out. GPUs of pods being deleted are also counted as `terminating`."""
    used: dict[str, int] = {}
    terminating: dict[str, int] = {}
    for pod in pods:
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name or is_pod_terminated(pod):
            continue
        gpus = pod_gpu_request(pod, resource)
        used[node_name] = used.get(node_name, 0) + gpus
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            terminating[node_name] = terminating.get(node_name, 0) + gpus
    result = []
    for node in nodes:
        allocatable = gpu_count(((node.get("status") or {}).get("allocatable") or {}).get(resource))
        if allocatable <= 0 or not _node_ready(node):
            continue
        meta = node.get("metadata") or {}
        name = str(meta["name"])
        result.append(
            NodeGpus(
                name=name,
                allocatable=allocatable,
                free=max(0, allocatable - used.get(name, 0)),
                labels=dict(meta.get("labels") or {}),
                taints=tuple((node.get("spec") or {}).get("taints") or ()),
                resource=resource,
                terminating=min(terminating.get(name, 0), allocatable),
            )
        )
    return sorted(result, key=lambda n: n.name)


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether any toleration matches the taint (core/v1 semantics)."""
    for toleration in tolerations:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        operator = toleration.get("operator") or "Equal"
        key = toleration.get("key")
        if not key:
            if operator == "Exists":
                return True
            continue
        if key != taint.get("key"):
            continue
        if operator == "Exists" or toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fits(
    node: NodeGpus, node_selector: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]]
) -> bool:
    """The node carries every selected label and each of its blocking taints is tolerated."""
    if any(node.labels.get(key) != value for key, value in node_selector.items()):
        return False
    return all(
        tolerates(tolerations, taint)
        for taint in node.taints
        if taint.get("effect") in _BLOCKING_TAINT_EFFECTS
    )
