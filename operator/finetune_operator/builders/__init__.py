"""Pure builders: (typed FineTuneJob, operator settings) -> child manifest dicts. No I/O, no kopf."""

from typing import Any

from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.builders.network import build_headless_service
from finetune_operator.builders.rbac import build_role_binding, build_service_account, build_trainer_role
from finetune_operator.builders.storage import build_checkpoint_pvc
from finetune_operator.builders.trainer_config import (
    build_deepspeed_config,
    build_trainer_configmap,
    render_trainer_config,
)
from finetune_operator.builders.trainer_job import build_trainer_job, shutdown_timeout_seconds
from finetune_operator.config import OperatorConfig


def build_children(job: FineTuneJob, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every long-lived child of a FineTuneJob (all but the per-attempt Job), in dependency order."""
    children = [
        build_service_account(job),
        build_trainer_role(job),
        build_role_binding(job),
        build_trainer_configmap(job, shutdown_timeout_seconds=shutdown_timeout_seconds(config)),
        build_headless_service(job, config.master_port),
    ]
    pvc = build_checkpoint_pvc(job, config)
    if pvc is not None:
        children.append(pvc)
    return children


__all__ = [
    "build_checkpoint_pvc",
    "build_children",
    "build_deepspeed_config",
    "build_headless_service",
    "build_role_binding",
    "build_service_account",
    "build_trainer_configmap",
    "build_trainer_job",
    "build_trainer_role",
    "render_trainer_config",
]
