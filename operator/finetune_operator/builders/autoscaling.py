"""Replica count and disruption: the HorizontalPodAutoscaler of the stable revision and the
PodDisruptionBudget of all server pods."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.modeldeployment import ModelDeployment
from finetune_operator.builders.serving_common import (
    STABLE,
    deployment_name,
    pod_selector,
    server_deployment_name,
    serving_metadata,
)

REQUESTS_WAITING_METRIC = "vllm:num_requests_waiting"
"""The servers' gauge of queued requests (both runtimes), as a custom-metrics adapter serves it."""


def build_hpa(md: ModelDeployment) -> dict[str, Any] | None:
    """autoscaling/v2 on the stable Deployment; None without `spec.autoscaling`. During a canary the
    canary's replicas follow the stable's count (rollout.split)."""
    scaling = md.spec.autoscaling
    if scaling is None:
        return None
    metrics: list[dict[str, Any]] = []
    if scaling.target_cpu_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization},
                },
            }
        )
    if scaling.target_requests_waiting is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": REQUESTS_WAITING_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(scaling.target_requests_waiting)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": serving_metadata(md, deployment_name(md), "autoscaler"),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": server_deployment_name(md, STABLE),
            },
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
        },
    }


def build_pdb(md: ModelDeployment) -> dict[str, Any]:
    """At most one server pod voluntarily disrupted at a time (a drain never takes them all at once, and
    never blocks forever on a single replica)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": serving_metadata(md, deployment_name(md), "disruption-budget"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_selector(md)}},
    }
