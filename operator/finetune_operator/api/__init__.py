"""Typed models of our two resources, the one source of their CRD schemas (see `crdgen`)."""

from finetune_operator.api.common import API_VERSION, GROUP, VERSION, Condition, InvalidResourceError
from finetune_operator.api.finetunejob import (
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    parse_finetunejob,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "InvalidResourceError",
    "parse_finetunejob",
]
