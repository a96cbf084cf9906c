"""Admission review of a ModelDeployment. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator.api.modeldeployment import ModelDeployment, ResolvedModel, parse_modeldeployment
from finetune_operator.builders.server_config import ServingBuildError, validated_server_config
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

VLLM_TASKS = ("causal-lm",)
PENDING_ARTIFACT = "pvc://artifact-not-written-yet/model"
"""Where a FineTuneJob's artifact is taken to be for the server-config check while the job has none yet:
the artifact is always a folder on the job's own claim, and the folder's path changes nothing the server
checks (the config is rendered again, with the real location, before anything is applied)."""


def review_modeldeployment(
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    view: ClusterView,
    policy: WebhookPolicy,
) -> list[Refusal]:
    def checks(review: Review, deployment: ModelDeployment) -> None:
        spec = deployment.spec
        check_scheme(review, "spec.model.uri", spec.model.uri, policy.allowed_model_schemes)
        check_scheme(review, "spec.model.baseModel", spec.model.base_model, policy.allowed_model_schemes)
        _check_model(review, deployment, view)
        _check_secret(review, deployment, view)
        _check_server_config(review, deployment, view)
        check_pod_gpus(review, "spec.resources.gpus", spec.resources.gpus, spec.resources, view.nodes, policy)

    return run_review(new, old, parse_modeldeployment, checks)


def _check_model(review: Review, deployment: ModelDeployment, view: ClusterView) -> None:
    spec, namespace = deployment.spec, view.namespace
    source = spec.model.from_fine_tune_job
    if source is not None:
        facts = view.finetunejobs.get(source)
        if facts is None:
            review.refuse(
                "spec.model.fromFineTuneJob",
                f"FineTuneJob {source!r} not found in namespace {namespace!r}; "
                "create it first or fix the name",
            )
        elif facts.phase == "Failed":
            review.refuse(
                "spec.model.fromFineTuneJob",
                f"FineTuneJob {source!r} has Failed and will never have an artifact; name one that succeeded",
            )
        elif spec.runtime.type == "vllm" and facts.task not in VLLM_TASKS:
            review.refuse(
                "spec.runtime.type",
                f"vllm serves causal-lm models, but FineTuneJob {source!r} trains {facts.task}; "
                "use runtime.type builtin",
            )
    for field_path, uri in (
        ("spec.model.uri", spec.model.uri),
        ("spec.model.baseModel", spec.model.base_model),
    ):
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in view.claims:
                review.refuse(
                    field_path, f"PersistentVolumeClaim {claim!r} not found in namespace {namespace!r}"
                )
    existing = spec.feedback.storage.existing_claim
    if existing and existing not in view.claims:
        review.refuse(
            "spec.feedback.storage.existingClaim",
            f"PersistentVolumeClaim {existing!r} not found in namespace {namespace!r}",
        )


def _check_secret(review: Review, deployment: ModelDeployment, view: ClusterView) -> None:
    spec, secrets, namespace = deployment.spec, view.secrets, view.namespace
    check_secret_key(review, "spec.auth.apiKeySecretRef", spec.auth.api_key_secret_ref, secrets, namespace)
    check_secret_key(
        review, "spec.model.encryptionKeySecretRef", spec.model.encryption_key_secret_ref, secrets, namespace
    )


def _served_model(deployment: ModelDeployment, view: ClusterView) -> ResolvedModel | None:
    """The model as the controller will resolve it; None when the source job is missing (refused above)."""
    ref = deployment.spec.model
    if ref.uri is not None:
        return ResolvedModel(
            uri=ref.uri,
            base_model=ref.base_model,
            task=ref.task,
            encryption_key_secret_ref=ref.encryption_key_secret_ref,
        )
    facts = view.finetunejobs.get(ref.from_fine_tune_job or "")
    if facts is None:
        return None
    return ResolvedModel.model_validate({"uri": facts.artifact_uri or PENDING_ARTIFACT, "task": facts.task})


def _check_server_config(review: Review, deployment: ModelDeployment, view: ClusterView) -> None:
    """Render the server config the operator would apply and refuse what the server would refuse, naming
    the spec field (for a FineTuneJob's model: `spec.model.fromFineTuneJob`, what the user chose)."""
    if deployment.spec.runtime.type != "builtin":
        return  # vLLM gets flags, not this config; its limits are CEL rules
    model = _served_model(deployment, view)
    if model is None:
        return
    try:
        validated_server_config(deployment, model)
    except ServingBuildError as exc:
        message = str(exc).removeprefix(f"{exc.field}: ")
        source = deployment.spec.model.from_fine_tune_job
        if source is not None and exc.field.startswith("spec.model."):
            review.refuse(
                "spec.model.fromFineTuneJob",
                f"FineTuneJob {source!r} trains {model.task}, and the server would refuse it: {message}",
            )
        else:
            review.refuse(exc.field, f"the server would refuse this: {message}")
