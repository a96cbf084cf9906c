"""Every child of a ModelDeployment for one serving plan (which revisions run, with how many replicas).

The plan is the controller's decision (rollout/ decides the canary's weight, rollout.split turns it into
replicas); this module only renders it. Optional kinds are rendered only when their API exists on the
cluster (`ClusterFeatures`): the Gateway API's HTTPRoute and the Prometheus Operator's PodMonitor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_operator.api.modeldeployment import ModelDeployment
from finetune_operator.builders.autoscaling import build_hpa, build_pdb
from finetune_operator.builders.server_config import build_server_configmap
from finetune_operator.builders.server_deployment import ServingRevision, build_server_deployment
from finetune_operator.builders.serving_common import CANARY, STABLE, Role
from finetune_operator.builders.serving_extras import build_feedback_pvc, build_pod_monitor
from finetune_operator.builders.serving_network import (
    build_http_route,
    build_network_policy,
    build_role_service,
    build_service,
)
from finetune_operator.config import OperatorConfig


@dataclass(frozen=True)
class ClusterFeatures:
    """Optional APIs installed on the cluster."""

    gateway_api: bool = False
    """`httproutes.gateway.networking.k8s.io` exists."""
    prometheus_operator: bool = False
    """`podmonitors.monitoring.coreos.com` exists."""


@dataclass(frozen=True)
class ServingPlan:
    """What runs now."""

    stable: ServingRevision | None
    """The revision the stable Deployment gets; None leaves that Deployment as it is (during a canary it
    runs the previous revision, whose spec the operator no longer has)."""
    stable_replicas: int | None
    """None: the HorizontalPodAutoscaler sets the count."""
    canary: ServingRevision | None = None
    canary_replicas: int = 0
    canary_weight: int = 0
    """Percent of traffic for the canary (the HTTPRoute's weight when routed)."""


def routed(md: ModelDeployment, features: ClusterFeatures) -> bool:
    """Whether traffic is split by HTTPRoute weights (else by replica proportion)."""
    canary = md.spec.rollout.canary
    return bool(canary and canary.gateway_ref and features.gateway_api)


def build_serving_children(
    md: ModelDeployment, plan: ServingPlan, features: ClusterFeatures, config: OperatorConfig
) -> list[dict[str, Any]]:
    """The children in dependency order: volumes and configs before the Deployments that mount them."""
    children: list[dict[str, Any]] = []
    feedback = build_feedback_pvc(md, config)
    if feedback is not None:
        children.append(feedback)
    revisions: list[tuple[Role, ServingRevision, int | None]] = []
    if plan.stable is not None:
        revisions.append((STABLE, plan.stable, plan.stable_replicas))
    if plan.canary is not None:
        revisions.append((CANARY, plan.canary, plan.canary_replicas))
    for _, revision, _ in revisions:
        if revision.config_name and revision.config_json:
            configmap = build_server_configmap(md, revision.config_name, revision.config_json)
            if configmap not in children:
                children.append(configmap)
    children += [
        build_server_deployment(md, revision, role, replicas) for role, revision, replicas in revisions
    ]
    children += [build_service(md), build_pdb(md), build_network_policy(md)]
    hpa = build_hpa(md)
    if hpa is not None:
        children.append(hpa)
    canary = md.spec.rollout.canary
    if canary is not None and canary.gateway_ref is not None and routed(md, features):
        children += [build_role_service(md, STABLE), build_role_service(md, CANARY)]
        children.append(build_http_route(md, canary.gateway_ref, plan.canary_weight if plan.canary else 0))
    monitor = build_pod_monitor(md)
    if monitor is not None and features.prometheus_operator:
        children.append(monitor)
    return children
