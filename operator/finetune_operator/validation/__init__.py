"""Admission checks for what the CRD schema and CEL cannot see: referenced objects, cluster shape,
the trainer's own config model, the operator's URI policy, and fields frozen while a job runs.

Pure: the webhook handler (handlers/webhooks.py) fetches a `ClusterView` of exactly the objects that
`lookups()` names, then calls `review_finetunejob` / `review_modeldeployment`.
"""

from finetune_operator.validation.cluster import ClusterView, Lookups, NodeOffer, lookups
from finetune_operator.validation.finetunejob import review_finetunejob
from finetune_operator.validation.modeldeployment import review_modeldeployment
from finetune_operator.validation.review import (
    CREATED_BY,
    AdmissionPolicy,
    Refusal,
    created_by_patch,
    refusal_text,
)

__all__ = [
    "CREATED_BY",
    "AdmissionPolicy",
    "ClusterView",
    "Lookups",
    "NodeOffer",
    "Refusal",
    "created_by_patch",
    "lookups",
    "refusal_text",
    "review_finetunejob",
    "review_modeldeployment",
]
