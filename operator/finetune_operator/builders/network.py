"""The headless Service that gives each trainer pod a stable DNS name for torchrun's rendezvous."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.builders.common import JOB_LABEL, child_metadata, job_name, service_name


def build_headless_service(job: FineTuneJob, master_port: int) -> dict[str, Any]:
    """`clusterIP: None` + `publishNotReadyAddresses`, so `<batch-job>-0.<svc>` resolves before pods are
    Ready. Pod hostnames already include the attempt, so old pods never answer for a new attempt."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, service_name(job), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job_name(job)},
            "ports": [
                {"name": "rendezvous", "port": master_port, "targetPort": master_port, "protocol": "TCP"}
            ],
        },
    }
