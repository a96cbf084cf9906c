"""The ModelDeployment's children, as the builders render them, are accepted by a real API server: a
server-side dry run of every kind (schema, defaults and admission), with a real owner."""

from __future__ import annotations

import json

from finetune_operator.api.modeldeployment import ResolvedModel, parse_modeldeployment
from finetune_operator.builders.server_deployment import build_revision
from finetune_operator.builders.serving import ClusterFeatures, ServingPlan, build_serving_children
from finetune_operator.builders.serving_extras import build_api_keys_secret
from finetune_operator.config import OperatorConfig
from tests.kube_helpers import Cluster, kubectl_json


def test_every_serving_child_passes_a_server_side_dry_run(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "dry"},
        "spec": {
            "model": {"uri": "pvc://models/tiny", "task": "causal-lm"},
            "quantization": {"method": "int8-dynamic"},
            "autoscaling": {"maxReplicas": 3, "targetCpuUtilization": 60},
            "resources": {"cpu": "1", "memory": "1Gi"},
            "rollout": {"strategy": "Canary", "canary": {"steps": [{"weight": 20}]}},
            "feedback": {"enabled": True},
        },
    }
    cluster.apply(body, namespace)
    stored = kubectl_json(cluster, "get", "modeldeployment", "dry", "-n", namespace)
    md = parse_modeldeployment(stored)
    config = OperatorConfig()
    stable = build_revision(md, ResolvedModel(uri="pvc://models/tiny", task="causal-lm"), config)
    canary = build_revision(md, ResolvedModel(uri="pvc://models/tiny-v2", task="causal-lm"), config)
    plan = ServingPlan(
        stable=stable, stable_replicas=None, canary=canary, canary_replicas=1, canary_weight=50
    )
    children = build_serving_children(md, plan, ClusterFeatures(), config)
    secret = build_api_keys_secret(md, "test-key")
    assert secret is not None
    children.append(secret)
    kinds = {child["kind"] for child in children}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert {"HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret"} <= kinds
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": children})
    result = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "--field-manager=finetune-operator",
        "-n", namespace, "-f", "-", input=listing,
    )  # fmt: skip
    assert result.stdout.count("serverside-applied (server dry run)") == len(children), result.stdout
