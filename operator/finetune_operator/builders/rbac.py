"""The trainer's identity: a ServiceAccount allowed only to read and patch its own job's status."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.common import GROUP
from finetune_operator.api.finetunejob import PLURAL, FineTuneJob
from finetune_operator.builders.common import child_metadata, job_name, trainer_name


def build_service_account(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": child_metadata(job, trainer_name(job), "trainer-identity"),
        # The token is mounted (the trainer patches status with it); nothing else is granted.
        "automountServiceAccountToken": True,
    }


def build_trainer_role(job: FineTuneJob) -> dict[str, Any]:
    """`get`/`patch` on this one FineTuneJob's status, and `get` on the job itself; nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": child_metadata(job, trainer_name(job), "trainer-identity"),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [job_name(job)],
                "verbs": ["get", "patch"],
            },
            {
                "apiGroups": [GROUP],
                "resources": [PLURAL],
                "resourceNames": [job_name(job)],
                "verbs": ["get"],
            },
        ],
    }


def build_role_binding(job: FineTuneJob) -> dict[str, Any]:
    name = trainer_name(job)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": child_metadata(job, name, "trainer-identity"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": str(job.metadata["namespace"])}],
    }
