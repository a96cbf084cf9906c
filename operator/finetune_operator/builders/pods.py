"""Resources and placement of a pod, shared by trainer and server pods."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.common import GPU_PRODUCT_LABEL, PodResources


def container_resources(res: PodResources, gpus: int) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS for what is set): CPU, memory, and `gpus` GPUs."""
    amounts: dict[str, Any] = {}
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    if gpus > 0:
        amounts[res.gpu_resource_name] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def tolerations(res: PodResources, gpus: int) -> list[dict[str, Any]]:
    """The user's tolerations, plus one for the GPU taint when the pods request GPUs."""
    out = [dict(t) for t in res.tolerations]
    resource = res.gpu_resource_name
    if gpus > 0 and not any(t.get("key") == resource for t in out):
        out.append({"key": resource, "operator": "Exists", "effect": "NoSchedule"})
    return out


def node_selector(res: PodResources) -> dict[str, str]:
    """The user's node labels plus the GPU product label."""
    selector = dict(res.node_selector)
    if res.gpu_product:
        selector[GPU_PRODUCT_LABEL] = res.gpu_product
    return selector


def placement(res: PodResources, gpus: int) -> dict[str, Any]:
    """`nodeSelector` and `tolerations` of a pod spec, each only when non-empty."""
    out: dict[str, Any] = {}
    selector = node_selector(res)
    if selector:
        out["nodeSelector"] = selector
    toleration_list = tolerations(res, gpus)
    if toleration_list:
        out["tolerations"] = toleration_list
    return out
