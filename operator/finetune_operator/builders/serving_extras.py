"""The server's other children: the generated API-key Secret, the feedback volume, the PodMonitor."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.common import DEFAULT_VOLUME_SIZE
from finetune_operator.api.modeldeployment import ModelDeployment
from finetune_operator.builders.serving_common import (
    GENERATED_API_KEYS_KEY,
    PORT_NAME,
    api_keys_secret_name,
    deployment_name,
    feedback_claim_name,
    pod_selector,
    serving_metadata,
)
from finetune_operator.builders.storage import claim_spec
from finetune_operator.config import OperatorConfig


def build_api_keys_secret(md: ModelDeployment, key: str) -> dict[str, Any] | None:
    """The Secret the operator creates once when auth is on and no Secret is named (`key` is made by the
    caller: builders stay deterministic). None when the user names their own Secret or auth is off."""
    if not md.spec.auth.enabled or md.spec.auth.api_key_secret_ref is not None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": serving_metadata(md, api_keys_secret_name(md), "api-keys"),
        "type": "Opaque",
        "stringData": {GENERATED_API_KEYS_KEY: key + "\n"},
    }


def build_feedback_pvc(md: ModelDeployment, config: OperatorConfig) -> dict[str, Any] | None:
    """The feedback volume; None when feedback is off or an existing claim is used. ReadWriteMany when
    there can be more than one replica (each appends to the same files)."""
    feedback = md.spec.feedback
    if not feedback.enabled or feedback.storage.existing_claim:
        return None
    several = md.spec.autoscaling is not None or md.spec.fixed_replicas > 1
    access = "ReadWriteMany" if several else "ReadWriteOnce"
    spec = claim_spec(feedback.storage, access=access, default_size=DEFAULT_VOLUME_SIZE, config=config)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": serving_metadata(md, feedback_claim_name(md), "feedback"),
        "spec": spec,
    }


def build_pod_monitor(md: ModelDeployment) -> dict[str, Any] | None:
    """Prometheus Operator PodMonitor for the server pods' `/metrics` (both revisions; the `revision` and
    `role` labels tell them apart); None when `monitoring.podMonitor` is off."""
    monitoring = md.spec.monitoring
    if not monitoring.pod_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": serving_metadata(md, deployment_name(md), "monitoring"),
        "spec": {
            "selector": {"matchLabels": pod_selector(md)},
            "podMetricsEndpoints": [
                {
                    "port": PORT_NAME,
                    "path": "/metrics",
                    "interval": f"{monitoring.scrape_interval_seconds}s",
                }
            ],
            "podTargetLabels": ["finetune.dev/revision", "finetune.dev/role"],
        },
    }
