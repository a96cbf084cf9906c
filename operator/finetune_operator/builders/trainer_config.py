"""The trainer's config (the versioned `finetune_trainer.config.TrainerConfig` schema), its DeepSpeed JSON,
and the ConfigMap that carries both into the pods."""

from __future__ import annotations

import json
from typing import Any

from pydantic.alias_generators import to_camel

from finetune_operator.api.finetunejob import FieldMapping, FineTuneJob
from finetune_operator.builders.common import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DEEPSPEED_FILE,
    OUTPUT_DIR,
    WORKSPACE_DIR,
    checkpoint_claim_name,
    child_metadata,
    config_map_name,
    job_name,
    namespace,
)
from finetune_operator.builders.encryption import ENCRYPTION_KEY_FILE
from finetune_trainer.config import TrainerConfig, parse_config
from finetune_trainer.deepspeed_config import deepspeed_config
from finetune_trainer.task_catalog import CATALOG, layout_for

SOURCE_MOUNT_ROOT = "/mnt/sources"
"""Claims named by `pvc://claim/path` sources are mounted read-only under here, one folder per claim."""


def _source_uris(job: FineTuneJob) -> list[tuple[str, str | None]]:
    """(field, URI) of every model and data source."""
    spec = job.spec
    return [
        ("spec.model.source", spec.model.source),
        ("spec.dataset.source", spec.dataset.source),
        ("spec.dataset.split.validationSource", spec.dataset.split.validation_source),
        ("spec.dataset.split.testSource", spec.dataset.split.test_source),
    ]


def source_claims(job: FineTuneJob) -> list[str]:
    """Claims that `pvc://` model and data sources name, in order of first use."""
    claims: list[str] = []
    for _, uri in _source_uris(job):
        if uri and uri.startswith("pvc://"):
            claim, _ = _claim_and_path(uri)
            if claim not in claims:
                claims.append(claim)
    return claims


def named_claims(job: FineTuneJob) -> list[tuple[str, str]]:
    """(field, claim) for every PersistentVolumeClaim the spec names (`pvc://` sources and output,
    `checkpointing.storage.existingClaim`): the pods mount them all."""
    uris = [*_source_uris(job), ("spec.output.uri", job.spec.output.uri)]
    named = [(field, _claim_and_path(uri)[0]) for field, uri in uris if uri and uri.startswith("pvc://")]
    existing = job.spec.checkpointing.storage.existing_claim
    if existing:
        named.append(("spec.checkpointing.storage.existingClaim", existing))
    return named


OUTPUT_MOUNT = "/mnt/output"
"""The claim of a `pvc://claim/path` `spec.output.uri` is mounted read-write here (unless it is the job's own
checkpoint claim, which is mounted at the workspace already)."""


def _claim_and_path(uri: str) -> tuple[str, str]:
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    return claim, rest


def output_copy_claim(job: FineTuneJob) -> str | None:
    """The claim that a `pvc://` `spec.output.uri` names, when the pods must mount it for the copy."""
    uri = job.spec.output.uri
    if uri is None or not uri.startswith("pvc://"):
        return None
    claim, _ = _claim_and_path(uri)
    return None if claim == checkpoint_claim_name(job) else claim


def output_copy_target(job: FineTuneJob) -> str | None:
    """Where the trainer writes the copy that `spec.output.uri` asks for (the trainer's `output.copyTo`):
    a path in the pod for `pvc://` (the mounted claim), the URI itself for `s3://` and `file://`."""
    uri = job.spec.output.uri
    if uri is None or not uri.startswith("pvc://"):
        return uri
    claim, rest = _claim_and_path(uri)
    base = WORKSPACE_DIR if claim == checkpoint_claim_name(job) else OUTPUT_MOUNT
    return f"{base}/{rest}".rstrip("/")


def _local_path(uri: str) -> str:
    """What the trainer opens for a source URI: pvc:// becomes the mounted path; others pass through."""
    if uri.startswith("pvc://"):
        claim, rest = _claim_and_path(uri)
        return f"{SOURCE_MOUNT_ROOT}/{claim}/{rest}".rstrip("/")
    return uri


def _model_section(job: FineTuneJob) -> dict[str, Any]:
    model = job.spec.model
    path, revision = model.source, model.revision
    if path.startswith("hf://") and "@" in path:
        path, revision = path.split("@", 1)
    section: dict[str, Any] = {"path": _local_path(path), "trustRemoteCode": model.trust_remote_code}
    if revision:
        section["revision"] = revision
    if job.spec.compliance and job.spec.compliance.model_license:
        section["license"] = job.spec.compliance.model_license
    return section


def _fields(task: str, mapping: FieldMapping | None) -> dict[str, Any]:
    """The trainer's `data.fields`: the task's row layout (the catalog's, as the API checked it) and the
    mapped columns; the task's default layout and column names when no mapping is given."""
    info = CATALOG[task]
    if mapping is None:
        return {"kind": info.layouts[0].kind}
    given = mapping.model_dump(exclude_none=True, by_alias=False)
    layout = layout_for(task, set(given))
    if layout is None:  # the API refuses such a mapping (CEL), so this is a bug, not bad input
        raise ValueError(f"spec.dataset.fieldMapping fits no row layout of task {task}: {sorted(given)}")
    return {"kind": layout.kind, **{to_camel(key): given[key] for key in layout.columns if key in given}}


def _augmentation(job: FineTuneJob) -> dict[str, Any] | None:
    augmentation = job.spec.dataset.augmentation
    if augmentation is None:
        return None
    # For causal-lm a copy is the row with its prompt rewritten by a template variant (the trainer's only
    # text-row augmentation); the other tasks' copies carry their image or text transforms.
    # Only the tasks that copy rows get copies (the API refuses copies for the others).
    copies = augmentation.copies if augmentation.copies is not None else 1
    variants = job.spec.task == "causal-lm" and copies > 0
    section: dict[str, Any] = {
        "strategy": "template-variants" if variants else "none",
        "seed": job.spec.hyperparameters.seed,
    }
    if "augmentation-copies" in CATALOG[job.spec.task].features:
        section["copies"] = copies
    if augmentation.image is not None:
        section["image"] = augmentation.image.model_dump(by_alias=True)
    if augmentation.text is not None:
        section["text"] = augmentation.text.model_dump(by_alias=True)
    if augmentation.negatives is not None:
        section["negatives"] = augmentation.negatives.model_dump(by_alias=True)
    return section


def _data_section(job: FineTuneJob) -> dict[str, Any]:
    dataset = job.spec.dataset
    prep = dataset.preprocessing
    validation, test = dataset.split.resolved_ratios()
    split: dict[str, Any] = {"validation": validation, "test": test, "seed": dataset.split.seed}
    if "split-seed" not in CATALOG[job.spec.task].features:
        # Leave-last-out per user (recommendation): the API refuses ratios, sources and a seed.
        split = {}
    if dataset.split.validation_source:
        split["validationSource"] = _local_path(dataset.split.validation_source)
    if dataset.split.test_source:
        split["testSource"] = _local_path(dataset.split.test_source)
    section: dict[str, Any] = {
        "source": _local_path(dataset.source),
        "format": dataset.format,
        "template": dataset.template,
        "maxSeqLength": job.spec.hyperparameters.max_seq_length,
        "cleaning": {
            "normalizeUnicode": prep.normalize_unicode,
            "stripHtml": prep.strip_html,
            "minChars": prep.min_length,
            "maxChars": prep.max_length,
        },
        "dedup": {
            "exact": prep.dedup.mode == "exact",
            "near": prep.dedup.mode == "near",
            "nearThreshold": prep.dedup.threshold,
        },
        "pii": {
            "policy": prep.pii.policy,
            "extraPatterns": [
                {"name": f"custom_{index}", "pattern": pattern}
                for index, pattern in enumerate(prep.pii.extra_patterns)
            ],
        },
        "badRows": {"maxRatio": dataset.bad_rows.max_ratio},
        "split": split,
    }
    section["fields"] = _fields(job.spec.task, dataset.field_mapping)
    if dataset.images is not None:  # only when given: the trainer refuses data.images on tasks without images
        section["images"] = dataset.images.model_dump(by_alias=True)
    augmentation = _augmentation(job)
    if augmentation is not None:
        section["augmentation"] = augmentation
    if job.spec.compliance:
        compliance = job.spec.compliance
        section["compliance"] = {
            "allowedLicenses": list(compliance.allowed_licenses),
            "datasetLicense": compliance.dataset_license,
            "modelLicense": compliance.model_license,
        }
    return section


def output_uri(job: FineTuneJob) -> str:
    """How users address `output.dir`: the same folder on the checkpoint claim (mounted at the workspace)."""
    on_claim = f"{OUTPUT_DIR}/{job.spec.output.path}".removeprefix(f"{WORKSPACE_DIR}/")
    return f"pvc://{checkpoint_claim_name(job)}/{on_claim}"


def _offload(job: FineTuneJob) -> str:
    """`cpu` offloads the optimizer states, and at ZeRO-3 the parameters too (as the API documents)."""
    deepspeed = job.spec.distributed.deepspeed
    if deepspeed is None or deepspeed.offload == "none":
        return "none"
    if deepspeed.offload != "cpu":  # the API refuses nvme (CEL): never render it as another offload
        raise ValueError(f"spec.distributed.deepspeed.offload {deepspeed.offload!r} has no trainer setting")
    return "all" if deepspeed.zero_stage == 3 else "optimizer"


def render_trainer_config(job: FineTuneJob, *, shutdown_timeout_seconds: int) -> dict[str, Any]:
    """The TrainerConfig for this job as a plain dict (camelCase keys), before validation."""
    spec = job.spec
    hp = spec.hyperparameters
    lora = spec.resolved_lora()
    evaluation = spec.evaluation
    early = spec.early_stopping
    config: dict[str, Any] = {
        "version": "v1",
        "task": spec.task,
        "model": _model_section(job),
        "data": _data_section(job),
        "method": spec.method,
        "hyperparameters": {
            "epochs": hp.epochs,
            "maxSteps": hp.max_steps,
            "microBatchSize": hp.batch_size,
            "gradientAccumulationSteps": hp.gradient_accumulation_steps,
            "learningRate": hp.learning_rate,
            "lrScheduler": hp.lr_scheduler,
            "lrCycles": hp.lr_cycles or 1,
            "warmupSteps": hp.warmup_steps,
            "warmupRatio": hp.resolved_warmup_ratio(),
            "weightDecay": hp.weight_decay,
            "maxGradNorm": hp.max_grad_norm,
            "dropout": hp.dropout,
            "labelSmoothing": hp.label_smoothing,
        },
        "evaluation": {
            # Omitted everySteps: at the end of each epoch; omitted evaluation: only after training.
            "everySteps": (evaluation.every_steps or 0) if evaluation else 0,
            "everyEpoch": evaluation is not None and evaluation.every_steps is None,
            "metrics": list(evaluation.metrics) if evaluation else ["loss"],
            "beforeTraining": evaluation is not None,
            "maxSamples": evaluation.max_samples if evaluation else None,
            "generationSamples": evaluation.generation_samples if evaluation else 0,
            "topK": evaluation.top_k if evaluation else None,
        },
        "earlyStopping": {"enabled": False},
        "checkpointing": {
            "dir": CHECKPOINT_DIR,
            "everySteps": spec.checkpointing.every_steps or 0,
            "keepLast": spec.checkpointing.keep_last,
            "saveOnEpochEnd": spec.checkpointing.save_on_epoch_end,
        },
        "distributed": {
            "zeroStage": spec.distributed.deepspeed.zero_stage if spec.distributed.deepspeed else 0,
            "offload": _offload(job),
            "precision": spec.distributed.precision,
            "shutdownTimeoutSeconds": shutdown_timeout_seconds,
        },
        "output": {
            "dir": f"{OUTPUT_DIR}/{spec.output.path}",
            "uri": output_uri(job),
            "mergeAdapter": spec.output.merge_adapter,
            "modelName": spec.output.model_name or job_name(job),
            "copyTo": output_copy_target(job),
            "copyToUri": spec.output.uri,
            "encryptionKeyFile": ENCRYPTION_KEY_FILE if spec.output.encryption_key_secret_ref else None,
        },
        "reporting": {"jobName": job_name(job), "namespace": namespace(job)},
        "seed": hp.seed,
    }
    if lora is not None:
        config["lora"] = {
            "r": lora.r,
            "alpha": float(lora.alpha),
            "dropout": lora.dropout,
            "targetModules": list(lora.target_modules) or ["all-linear"],
        }
    if early is not None:
        config["earlyStopping"] = {
            "enabled": True,
            "metric": early.metric,
            "mode": early.mode,
            "patience": early.patience,
            "minDelta": early.min_delta,
        }
    cleaned: dict[str, Any] = _drop_none(config)
    return cleaned


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def json_by_section(document: dict[str, Any]) -> str:
    """JSON with one line per top-level key (sorted): readable in `kubectl get configmap -o yaml`, and
    rendered by the json module's C encoder, which `indent=` would swap for its pure-Python one. Not YAML:
    PyYAML's Python representer was the largest single part of the operator's CPU for a burst of new jobs."""
    lines = [f"  {json.dumps(key)}: {json.dumps(document[key], sort_keys=True)}" for key in sorted(document)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def build_deepspeed_config(job: FineTuneJob, config: TrainerConfig) -> dict[str, Any]:
    """The trainer's own DeepSpeed JSON (`finetune_trainer.deepspeed_config`) for the rendered config and the
    gang's world size; the trainer uses this file, after checking it against the world size it runs with."""
    distributed = job.spec.distributed
    return deepspeed_config(config, distributed.world_size, pin_memory=distributed.gpus_per_node > 0)


def validated_trainer_config(job: FineTuneJob, *, shutdown_timeout_seconds: int) -> TrainerConfig:
    """The rendered config parsed by the trainer's own model; raises `finetune_trainer.config.ConfigError`."""
    return parse_config(render_trainer_config(job, shutdown_timeout_seconds=shutdown_timeout_seconds))


def build_trainer_configmap(job: FineTuneJob, *, shutdown_timeout_seconds: int) -> dict[str, Any]:
    """ConfigMap with `trainer.json` and `deepspeed.json`. The config holds what the operator decided
    (the trainer's defaults fill the rest, under the pinned `version`) and is validated by the trainer's
    own model first, so a config the trainer would refuse never reaches a pod."""
    rendered = render_trainer_config(job, shutdown_timeout_seconds=shutdown_timeout_seconds)
    config = parse_config(rendered)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, config_map_name(job), "trainer-config"),
        "data": {
            CONFIG_FILE: json_by_section(rendered),
            DEEPSPEED_FILE: json_by_section(build_deepspeed_config(job, config)),
        },
    }
