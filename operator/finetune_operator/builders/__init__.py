"""Pure builders: (typed FineTuneJob, operator settings) -> child manifest dicts. No I/O, no kopf."""

from finetune_operator.builders.network import build_headless_service
from finetune_operator.builders.rbac import build_role_binding, build_service_account, build_trainer_role
from finetune_operator.builders.storage import build_checkpoint_pvc
from finetune_operator.builders.trainer_config import (
    build_deepspeed_config,
    build_trainer_configmap,
    render_trainer_config,
)
from finetune_operator.builders.trainer_job import build_trainer_job

__all__ = [
    "build_checkpoint_pvc",
    "build_deepspeed_config",
    "build_headless_service",
    "build_role_binding",
    "build_service_account",
    "build_trainer_configmap",
    "build_trainer_job",
    "build_trainer_role",
    "render_trainer_config",
]
