"""How requests reach the server pods: the Service, the HTTPRoute that splits traffic by weight when the
Gateway API is installed, and the NetworkPolicy that opens only the API port."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.modeldeployment import GatewayRef, ModelDeployment
from finetune_operator.builders.serving_common import (
    CANARY,
    PORT_NAME,
    SERVER_PORT,
    SERVICE_PORT,
    STABLE,
    Role,
    deployment_name,
    namespace,
    pod_selector,
    role_selector,
    role_service_name,
    service_name,
    serving_metadata,
)


def _service(md: ModelDeployment, name: str, selector: dict[str, str], component: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": serving_metadata(md, name, component),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def build_service(md: ModelDeployment) -> dict[str, Any]:
    """`NAME`: every ready server pod of either revision, so without a route the canary's share of the
    traffic is its share of the ready replicas."""
    return _service(md, service_name(md), pod_selector(md), "endpoint")


def build_role_service(md: ModelDeployment, role: Role) -> dict[str, Any]:
    """`NAME-stable` / `NAME-canary`: one revision's pods, the backends of the HTTPRoute."""
    return _service(md, role_service_name(md, role), role_selector(md, role), f"endpoint-{role}")


def build_http_route(md: ModelDeployment, gateway: GatewayRef, canary_weight: int) -> dict[str, Any]:
    """Gateway API HTTPRoute through `gateway`: exact weights between the stable and the canary Service."""
    if not 0 <= canary_weight <= 100:
        raise ValueError(f"canary weight {canary_weight} is not a percentage")
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway.name}
    if gateway.namespace and gateway.namespace != namespace(md):
        parent["namespace"] = gateway.namespace
    backends = [
        {"name": role_service_name(md, STABLE), "port": SERVICE_PORT, "weight": 100 - canary_weight},
        {"name": role_service_name(md, CANARY), "port": SERVICE_PORT, "weight": canary_weight},
    ]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": serving_metadata(md, deployment_name(md), "route"),
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": backends,
                }
            ],
        },
    }


def build_network_policy(md: ModelDeployment) -> dict[str, Any]:
    """Only the API port of the server pods takes connections (from anywhere: clients live in other
    namespaces); egress is left open (vLLM may download a model from the Hub)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": serving_metadata(md, deployment_name(md), "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": pod_selector(md)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": SERVER_PORT, "protocol": "TCP"}]}],
        },
    }
