"""Admission reviews (pure): each case the CRD can't refuse, refused with the field named; valid ones pass."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_operator.validation import (
    CREATED_BY,
    ClusterView,
    NodeOffer,
    WebhookPolicy,
    created_by_patch,
    lookups,
    refusal_text,
    review_finetunejob,
    review_modeldeployment,
)
from finetune_operator.validation.cluster import FineTuneJobFacts
from finetune_operator.validation.defaults import (
    DEFAULT_CLASS_ANNOTATION,
    DEFAULTED,
    ClusterDefaults,
    default_storage_class,
    defaults_patch,
    needs_cluster_defaults,
)
from tests.api_examples import EXAMPLES, load

H100 = "NVIDIA-H100-80GB-HBM3"
NODES = (
    NodeOffer("gpu-a", {"nvidia.com/gpu.product": H100}, {"nvidia.com/gpu": 8}),
    NodeOffer("gpu-b", {"nvidia.com/gpu.product": "NVIDIA-L4"}, {"nvidia.com/gpu": 4}),
    NodeOffer("cpu-1", {}, {}),
)


def ftj(**spec: Any) -> dict[str, Any]:
    body = load(EXAMPLES / "finetunejob-causal-lm-lora.yaml")
    body["metadata"]["namespace"] = "team-a"
    body["spec"].update(spec)
    return body


def mdep(**spec: Any) -> dict[str, Any]:
    body = load(EXAMPLES / "modeldeployment-rolling.yaml")
    body["metadata"]["namespace"] = "team-a"
    body["spec"].update(spec)
    return body


def view(**overrides: Any) -> ClusterView:
    base: dict[str, Any] = {
        "namespace": "team-a",
        "secrets": {
            "hf-token": frozenset({"HF_TOKEN"}),
            "api-keys": frozenset({"keys"}),
            "support-bot-api-key": frozenset({"api-key"}),
        },
        "claims": frozenset({"datasets", "models"}),
        "finetunejobs": {"support-bot-lora": FineTuneJobFacts("causal-lm", "Succeeded")},
        "nodes": NODES,
    }
    return ClusterView(**{**base, **overrides})


POLICY = WebhookPolicy()
STRICT = WebhookPolicy(allowed_model_schemes=("hf", "pvc"), allowed_dataset_schemes=("pvc", "s3"))


def fields(refusals: list[Any]) -> list[str]:
    return [r.field for r in refusals]


def test_valid_examples_pass() -> None:
    for name in EXAMPLES.glob("finetunejob-*.yaml"):
        body = load(name)
        body["metadata"]["namespace"] = "team-a"
        claims = frozenset(lookups("FineTuneJob", body).claims)
        secrets = {s: frozenset({"HF_TOKEN"}) for s in lookups("FineTuneJob", body).secrets}
        refusals = review_finetunejob(body, None, view(claims=claims, secrets=secrets), POLICY)
        assert refusals == [], name


def test_lookups_name_exactly_what_the_review_reads() -> None:
    found = lookups("FineTuneJob", ftj(credentialsSecret="hf-token"))
    assert found.secrets == ("hf-token",)
    assert found.claims == ("datasets",)
    assert found.nodes is True
    assert lookups("FineTuneJob", {"spec": {"task": "nope"}}).claims == ()
    found = lookups("ModelDeployment", mdep())
    assert found.finetunejobs == ("support-bot-lora",)


INVALID_FTJ: list[tuple[str, dict[str, Any], ClusterView, WebhookPolicy, str, str]] = [
    (
        "credentials Secret missing",
        ftj(credentialsSecret="s3-creds"),
        view(),
        POLICY,
        "spec.credentialsSecret",
        "Secret 's3-creds' not found in namespace 'team-a'",
    ),
    (
        "dataset claim missing",
        ftj(),
        view(claims=frozenset()),
        POLICY,
        "spec.dataset.source",
        "PersistentVolumeClaim 'datasets' not found",
    ),
    (
        "existing checkpoint claim missing",
        ftj(checkpointing={"storage": {"existingClaim": "ckpt"}}),
        view(),
        POLICY,
        "spec.checkpointing.storage.existingClaim",
        "PersistentVolumeClaim 'ckpt' not found",
    ),
    (
        "more GPUs per pod than any node has",
        ftj(distributed={"nodes": 2, "gpusPerNode": 16}),
        view(),
        POLICY,
        "spec.distributed.gpusPerNode",
        "16 GPUs per pod, but the largest node offering nvidia.com/gpu of product "
        "NVIDIA-H100-80GB-HBM3 has 8",
    ),
    (
        "GPU product that no node offers",
        ftj(resources={"gpuProduct": "NVIDIA-B200"}),
        view(),
        POLICY,
        "spec.distributed.gpusPerNode",
        "no node offers nvidia.com/gpu of product NVIDIA-B200; "
        "nodes offer: NVIDIA-H100-80GB-HBM3 (8 each), NVIDIA-L4 (4 each)",
    ),
    (
        "more GPUs than the nodes of that product have",
        ftj(distributed={"gpusPerNode": 8}, resources={"gpuProduct": "NVIDIA-L4"}),
        view(),
        POLICY,
        "spec.distributed.gpusPerNode",
        "largest node offering nvidia.com/gpu of product NVIDIA-L4 has 4",
    ),
    (
        "model scheme not allowed by policy",
        ftj(model={"source": "s3://models/qwen"}),
        view(),
        STRICT,
        "spec.model.source",
        "scheme s3:// is not allowed by the operator's policy (allowed: hf://, pvc://)",
    ),
    (
        "dataset scheme not allowed by policy",
        ftj(dataset={**ftj()["spec"]["dataset"], "source": "file:///data/train.jsonl"}),
        view(),
        STRICT,
        "spec.dataset.source",
        "scheme file:// is not allowed",
    ),
    (
        "output scheme not allowed by policy",
        ftj(output={"uri": "file:///exports/model"}),
        view(),
        STRICT,
        "spec.output.uri",
        "scheme file:// is not allowed",
    ),
    (
        "the trainer refuses the rendered config",
        ftj(output={"uri": "pvc://support-bot-lora-checkpoints/output/model/copy"}),
        view(),
        POLICY,
        "spec",
        "the trainer would refuse its config: invalid trainer config: output: Value error, output.copyTo",
    ),
]


@pytest.mark.parametrize(("case", "body", "cluster", "policy", "field", "message"), INVALID_FTJ)
def test_invalid_finetunejob_is_refused_naming_the_field(
    case: str, body: dict[str, Any], cluster: ClusterView, policy: WebhookPolicy, field: str, message: str
) -> None:
    refusals = review_finetunejob(body, None, cluster, policy)
    assert fields(refusals) == [field], (case, refusals)
    assert message in refusals[0].message, (case, refusals[0].message)


def running(body: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    old = copy.deepcopy(body)
    old["status"] = {"phase": phase}
    return old


def test_fields_frozen_while_running_but_not_once_suspended() -> None:
    old = running(ftj())
    new = ftj(hyperparameters={**old["spec"]["hyperparameters"], "epochs": 9})
    (refusal,) = review_finetunejob(new, old, view(), POLICY)
    assert refusal.field == "spec.hyperparameters"
    assert "can't change while the job is Running: suspend it first" in refusal.message
    new["spec"]["scheduling"] = {"suspend": True}
    assert review_finetunejob(new, old, view(), POLICY) == []
    queued = running(ftj(), "Queued")
    assert review_finetunejob(ftj(distributed={"gpusPerNode": 2}), queued, view(), POLICY) == []


def test_finished_job_spec_is_frozen_except_scheduling() -> None:
    old = running(ftj(), "Succeeded")
    (refusal,) = review_finetunejob(ftj(image="trainer:2"), old, view(), POLICY)
    assert refusal.field == "spec.image"
    assert "has Succeeded" in refusal.message
    assert review_finetunejob(ftj(scheduling={"ttlSecondsAfterFinished": 60}), old, view(), POLICY) == []


def test_created_by_cannot_change_and_metadata_only_updates_are_not_reviewed() -> None:
    old = ftj()
    old["metadata"]["annotations"] = {CREATED_BY: "alice"}
    new = copy.deepcopy(old)
    new["metadata"]["annotations"][CREATED_BY] = "mallory"
    (refusal,) = review_finetunejob(new, old, view(claims=frozenset()), POLICY)
    assert refusal.field == f"metadata.annotations[{CREATED_BY}]"
    assert "'alice'" in refusal.message
    # The operator's own metadata patches (finalizers, kopf annotations) aren't checked against the cluster.
    same = copy.deepcopy(old)
    same["metadata"]["finalizers"] = ["finetune.dev/finalizer"]
    assert review_finetunejob(same, old, view(claims=frozenset()), POLICY) == []


def test_gpu_shape_check_can_be_turned_off_and_skips_cpu_jobs() -> None:
    body = ftj(distributed={"gpusPerNode": 16})
    assert review_finetunejob(body, None, view(), WebhookPolicy(check_gpu_shape=False)) == []
    assert (
        review_finetunejob(ftj(distributed={"gpusPerNode": 0}, resources={}), None, view(nodes=()), POLICY)
        == []
    )


INVALID_MDEP: list[tuple[str, dict[str, Any], ClusterView, str, str]] = [
    (
        "source FineTuneJob missing",
        mdep(model={"fromFineTuneJob": "nope"}),
        view(),
        "spec.model.fromFineTuneJob",
        "FineTuneJob 'nope' not found in namespace 'team-a'",
    ),
    (
        "source FineTuneJob failed",
        mdep(),
        view(finetunejobs={"support-bot-lora": FineTuneJobFacts("causal-lm", "Failed")}),
        "spec.model.fromFineTuneJob",
        "has Failed and will never have an artifact",
    ),
    (
        "API key Secret missing",
        mdep(auth={"apiKeySecretRef": {"name": "other", "key": "keys"}}),
        view(),
        "spec.auth.apiKeySecretRef.name",
        "Secret 'other' not found",
    ),
    (
        "API key Secret lacks the key",
        mdep(auth={"apiKeySecretRef": {"name": "api-keys", "key": "token"}}),
        view(),
        "spec.auth.apiKeySecretRef.key",
        "Secret 'api-keys' has no key 'token' (keys: keys)",
    ),
    (
        "model claim missing",
        mdep(model={"uri": "pvc://archive/model", "task": "causal-lm"}),
        view(),
        "spec.model.uri",
        "PersistentVolumeClaim 'archive' not found",
    ),
    (
        "more GPUs per replica than any node has",
        mdep(resources={"gpus": 12}, quantization={"method": "none"}),
        view(),
        "spec.resources.gpus",
        "12 GPUs per pod, but the largest node offering nvidia.com/gpu has 8",
    ),
    # The rendered server config, refused as the operator would refuse it after the object was stored.
    (
        "builtin runtime for a Hub model",
        mdep(model={"uri": "hf://org/model", "task": "causal-lm"}),
        view(),
        "spec.model.uri",
        "the server would refuse this: the builtin runtime serves a model folder (pvc:// or file://), not hf://",
    ),
    (
        "builtin runtime for a Hub base model",
        mdep(model={"uri": "file:///models/adapter", "task": "causal-lm", "baseModel": "hf://org/base"}),
        view(),
        "spec.model.baseModel",
        "not hf://",
    ),
]


def test_the_server_config_check_uses_the_jobs_artifact_once_it_has_one() -> None:
    done = FineTuneJobFacts(
        "causal-lm", "Succeeded", "pvc://support-bot-lora-checkpoints/output/model/adapter"
    )
    assert review_modeldeployment(mdep(), None, view(finetunejobs={"support-bot-lora": done}), POLICY) == []
    # A vLLM deployment gets flags, not the server config: a Hub model is fine there.
    vllm = mdep(model={"uri": "hf://org/model", "task": "causal-lm"}, runtime={"type": "vllm"})
    vllm["spec"]["resources"] = {"gpus": 1}
    vllm["spec"]["quantization"] = {"method": "none"}
    assert review_modeldeployment(vllm, None, view(), POLICY) == []


@pytest.mark.parametrize(("case", "body", "cluster", "field", "message"), INVALID_MDEP)
def test_invalid_modeldeployment_is_refused_naming_the_field(
    case: str, body: dict[str, Any], cluster: ClusterView, field: str, message: str
) -> None:
    refusals = review_modeldeployment(body, None, cluster, POLICY)
    assert fields(refusals) == [field], (case, refusals)
    assert message in refusals[0].message, (case, refusals[0].message)


def test_valid_modeldeployments_pass() -> None:
    for name in EXAMPLES.glob("modeldeployment-*.yaml"):
        body = load(name)
        body["metadata"]["namespace"] = "team-a"
        found = lookups("ModelDeployment", body)
        cluster = view(
            finetunejobs={n: FineTuneJobFacts("causal-lm", "Succeeded") for n in found.finetunejobs},
            claims=frozenset(found.claims),
            secrets={s: frozenset({"api-key"}) for s in found.secrets},
        )
        assert review_modeldeployment(body, None, cluster, POLICY) == [], name


def test_created_by_patch_adds_or_sets_the_annotation() -> None:
    assert created_by_patch({"metadata": {}}, "alice") == [
        {"op": "add", "path": "/metadata/annotations", "value": {CREATED_BY: "alice"}}
    ]
    assert created_by_patch({"metadata": {"annotations": {"a": "b"}}}, "bob") == [
        {"op": "add", "path": "/metadata/annotations/finetune.dev~1created-by", "value": "bob"}
    ]


def test_refusal_text_lists_every_field() -> None:
    refusals = review_finetunejob(ftj(credentialsSecret="x"), None, view(claims=frozenset()), POLICY)
    text = refusal_text("FineTuneJob", "support-bot-lora", refusals)
    assert text.startswith("FineTuneJob 'support-bot-lora' refused: spec.credentialsSecret: Secret 'x'")
    assert "spec.dataset.source: PersistentVolumeClaim 'datasets'" in text


def storage_class(name: str, default: bool, created: str) -> dict[str, Any]:
    annotations = {DEFAULT_CLASS_ANNOTATION: "true"} if default else {}
    return {"metadata": {"name": name, "annotations": annotations, "creationTimestamp": created}}


def test_the_default_storage_class_is_the_newest_marked_one() -> None:
    classes = [
        storage_class("old-default", True, "2026-01-01T00:00:00Z"),
        storage_class("new-default", True, "2026-06-01T00:00:00Z"),
        storage_class("fast", False, "2026-12-01T00:00:00Z"),
    ]
    assert default_storage_class(classes) == "new-default"
    assert default_storage_class([storage_class("fast", False, "2026-12-01T00:00:00Z")]) is None


def test_cluster_defaults_fill_only_what_the_request_left_unset() -> None:
    found = ClusterDefaults(storage_class="standard", local_queue="default")
    job = ftj()
    job["spec"].pop("scheduling", None)
    job["spec"]["checkpointing"] = {"everySteps": 50}
    assert defaults_patch("FineTuneJob", job, found) == {
        "spec": {
            "checkpointing": {"storage": {"storageClassName": "standard"}},
            "scheduling": {"queueName": "default"},
        },
        "metadata": {
            "annotations": {
                DEFAULTED: "spec.checkpointing.storage.storageClassName=standard,"
                "spec.scheduling.queueName=default"
            }
        },
    }
    written = ftj(
        checkpointing={"storage": {"storageClassName": "fast"}}, scheduling={"queueName": "team-a-gpus"}
    )
    assert defaults_patch("FineTuneJob", written, found) == {}
    assert needs_cluster_defaults("FineTuneJob", written) == (False, False)
    existing = ftj(checkpointing={"storage": {"existingClaim": "mine"}}, scheduling={"priority": 3})
    assert defaults_patch("FineTuneJob", existing, ClusterDefaults(storage_class="standard")) == {}
    assert defaults_patch("FineTuneJob", job, ClusterDefaults()) == {}, "nothing found, nothing filled"


def test_a_modeldeployment_gets_a_storage_class_only_for_its_feedback_claim() -> None:
    found = ClusterDefaults(storage_class="standard", local_queue="default")
    assert defaults_patch("ModelDeployment", mdep(feedback={"enabled": False}), found) == {}
    with_feedback = mdep(feedback={"enabled": True})
    assert defaults_patch("ModelDeployment", with_feedback, found)["spec"] == {
        "feedback": {"storage": {"storageClassName": "standard"}}
    }
