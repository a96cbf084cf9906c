"""Admission review of a FineTuneJob. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJob, parse_finetunejob
from finetune_operator.builders.common import checkpoint_claim_name
from finetune_operator.builders.trainer_config import named_claims, validated_trainer_config
from finetune_operator.validation.cluster import ClusterView
from finetune_operator.validation.review import (
    Refusal,
    Review,
    WebhookPolicy,
    check_scheme,
    check_secret_key,
    run_review,
)
from finetune_operator.validation.shape import check_pod_gpus
from finetune_trainer.config import ConfigError

FROZEN_WHILE_RUNNING = (
    "distributed",
    "hyperparameters",
    "lora",
    "resources",
    "checkpointing",
    "image",
    "output",
)
"""Spec fields (camelCase) that can't change while pods train: the running gang was built from them.
Suspend the job first (then they may change and the next attempt uses them), or create a new job.
`task`, `model`, `dataset` and `method` can never change (CRD rule); `scheduling` may always change."""
RUNNING_PHASES = ("Running", "Restarting")
TERMINAL_PHASES = ("Succeeded", "Failed")


def review_finetunejob(
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    view: ClusterView,
    policy: WebhookPolicy,
) -> list[Refusal]:
    """Refusals for a CREATE (`old` None) or UPDATE; empty when the request may be stored."""

    def checks(review: Review, job: FineTuneJob) -> None:
        if old is not None:
            _check_transition(review, new, old)
        _check_schemes(review, job, policy)
        _check_references(review, job, view)
        gpus = job.spec.distributed.gpus_per_node
        check_pod_gpus(review, "spec.distributed.gpusPerNode", gpus, job.spec.resources, view.nodes, policy)
        try:
            validated_trainer_config(job, shutdown_timeout_seconds=policy.shutdown_timeout_seconds)
        except ConfigError as exc:
            review.refuse("spec", "the trainer would refuse its config: " + " ".join(str(exc).split()))

    return run_review(new, old, parse_finetunejob, checks)


def _check_transition(review: Review, new: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    phase = (old.get("status") or {}).get("phase")
    before, after = old.get("spec") or {}, new.get("spec") or {}
    if phase in TERMINAL_PHASES:
        changed = sorted(
            k for k in set(before) | set(after) if k != "scheduling" and before.get(k) != after.get(k)
        )
        if changed:
            review.refuse(
                f"spec.{changed[0]}",
                f"the job has {phase}; its spec can't change (only spec.scheduling, e.g. "
                "ttlSecondsAfterFinished); create a new FineTuneJob",
            )
        return
    if phase not in RUNNING_PHASES:
        return
    suspending = bool((after.get("scheduling") or {}).get("suspend"))
    for key in FROZEN_WHILE_RUNNING:
        if before.get(key) != after.get(key) and not suspending:
            review.refuse(
                f"spec.{key}",
                f"can't change while the job is {phase}: suspend it first (spec.scheduling.suspend: true) "
                "and change it then, or create a new FineTuneJob",
            )


def _check_schemes(review: Review, job: FineTuneJob, policy: WebhookPolicy) -> None:
    spec = job.spec
    check_scheme(review, "spec.model.source", spec.model.source, policy.allowed_model_schemes)
    for field_path, uri in (
        ("spec.dataset.source", spec.dataset.source),
        ("spec.dataset.split.validationSource", spec.dataset.split.validation_source),
        ("spec.dataset.split.testSource", spec.dataset.split.test_source),
        ("spec.output.uri", spec.output.uri),
    ):
        check_scheme(review, field_path, uri, policy.allowed_dataset_schemes)


def _check_references(review: Review, job: FineTuneJob, view: ClusterView) -> None:
    namespace = view.namespace
    secret = job.spec.credentials_secret
    if secret and secret not in view.secrets:
        review.refuse(
            "spec.credentialsSecret",
            f"Secret {secret!r} not found in namespace {namespace!r}; create it first or fix the name",
        )
    check_secret_key(
        review,
        "spec.output.encryptionKeySecretRef",
        job.spec.output.encryption_key_secret_ref,
        view.secrets,
        namespace,
    )
    # The operator creates the job's own checkpoint claim, unless existingClaim names one to use.
    own = None if job.spec.checkpointing.storage.existing_claim else checkpoint_claim_name(job)
    for field_path, claim in named_claims(job):
        if claim not in view.claims and claim != own:
            review.refuse(
                field_path,
                f"PersistentVolumeClaim {claim!r} not found in namespace {namespace!r}; create it first "
                "or fix the name",
            )
