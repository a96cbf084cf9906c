"""GPU admission: capacity per node, gang placement, priority order, quota. Pure functions."""

from finetune_operator.api.common import GPU_PRODUCT_LABEL
from finetune_operator.scheduling.capacity import (
    GPU_RESOURCE,
    NodeGpus,
    free_gpus_by_node,
    pod_gpu_request,
)
from finetune_operator.scheduling.placement import place_gang
from finetune_operator.scheduling.queue import (
    INSUFFICIENT_GPUS,
    QUOTA_EXCEEDED,
    AdmissionPlan,
    GangDemand,
    Waiting,
    admission_order,
    plan_admission,
    waiting_message,
)

__all__ = [
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "INSUFFICIENT_GPUS",
    "QUOTA_EXCEEDED",
    "AdmissionPlan",
    "GangDemand",
    "NodeGpus",
    "Waiting",
    "admission_order",
    "free_gpus_by_node",
    "place_gang",
    "plan_admission",
    "pod_gpu_request",
    "waiting_message",
]
