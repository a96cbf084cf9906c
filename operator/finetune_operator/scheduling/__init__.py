"""GPU admission: capacity per node, gang placement, priority order, holds, preemption, quota. Pure."""

from finetune_operator.api.common import GPU_PRODUCT_LABEL
from finetune_operator.scheduling.capacity import (
    GPU_RESOURCE,
    NodeGpus,
    free_gpus_by_node,
    pod_gpu_request,
)
from finetune_operator.scheduling.placement import place_gang
from finetune_operator.scheduling.preemption import Candidate, Victims, select_victims
from finetune_operator.scheduling.queue import (
    DRAINING,
    INSUFFICIENT_GPUS,
    PREEMPTED,
    PREEMPTING,
    QUOTA_EXCEEDED,
    AdmissionPlan,
    AdmissionPolicy,
    GangDemand,
    Preemption,
    Waiting,
    admission_order,
    plan_admission,
    waiting_message,
)

__all__ = [
    "DRAINING",
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "INSUFFICIENT_GPUS",
    "PREEMPTED",
    "PREEMPTING",
    "QUOTA_EXCEEDED",
    "AdmissionPlan",
    "AdmissionPolicy",
    "Candidate",
    "GangDemand",
    "NodeGpus",
    "Preemption",
    "Victims",
    "Waiting",
    "admission_order",
    "free_gpus_by_node",
    "place_gang",
    "plan_admission",
    "pod_gpu_request",
    "select_victims",
    "waiting_message",
]
