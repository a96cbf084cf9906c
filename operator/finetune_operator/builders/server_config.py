"""The server's config (`finetune_server.config.ServerConfig`) rendered from a ModelDeployment and
validated with the server's own model before it is applied, and the ConfigMap that carries it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import ValidationError

from finetune_operator.api.common import field_path
from finetune_operator.api.modeldeployment import ModelDeployment, ResolvedModel
from finetune_operator.builders.encryption import ENCRYPTION_KEY_FILE
from finetune_operator.builders.serving_common import (
    SERVER_PORT,
    deployment_name,
    serving_metadata,
)
from finetune_server.config import Auth, Encryption, Feedback, ServedTask, ServerConfig

SERVER_CONFIG_DIR = "/etc/finetune-server/config"
"""The config volume, beside (not above) the API-key mount: a mount point inside a read-only ConfigMap
volume can't be created."""
SERVER_CONFIG_FILE = "server.json"
API_KEYS_DIR = str(Auth().api_keys_dir)
"""Where the API-key Secret is mounted (the server's default `auth.apiKeysDir`)."""
FEEDBACK_DIR = str(Feedback().dir)
"""Where the feedback volume is mounted (the server's default `feedback.dir`)."""
MODEL_MOUNT = "/mnt/model"
"""A `pvc://claim/path` model's claim is mounted read-only here."""
BASE_MODEL_MOUNT = "/mnt/base-model"
DEFAULT_MAX_NEW_TOKENS = 16
"""`max_tokens` of a request that gives none (or `runtime.maxNewTokens` when that is lower)."""


class ServingBuildError(ValueError):
    """The spec can't be served as written; `field` is the spec field to change."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ModelLocation:
    """Where the pod finds a model: a path, on a claim it mounts or already in the pod's filesystem."""

    path: str
    claim: str | None = None
    """The PersistentVolumeClaim to mount (read-only) for a `pvc://` model."""


def model_location(uri: str, field: str, mount: str = MODEL_MOUNT) -> ModelLocation:
    """A folder the built-in server can open: `pvc://claim/path` (mounted) or `file:///path`."""
    if uri.startswith("pvc://"):
        claim, _, rest = uri.removeprefix("pvc://").partition("/")
        return ModelLocation(f"{mount}/{rest}".rstrip("/"), claim)
    if uri.startswith("file://"):
        return ModelLocation(uri.removeprefix("file://"))
    scheme = uri.split("://", 1)[0]
    raise ServingBuildError(
        field,
        f"the builtin runtime serves a model folder (pvc:// or file://), not {scheme}://; "
        "copy the model to a claim, or use runtime.type vllm for hf://",
    )


def served_task(model: ResolvedModel) -> ServedTask:
    tasks = get_args(ServedTask)
    if model.task not in tasks:
        raise ServingBuildError(
            "spec.model.task",
            f"the builtin server serves {', '.join(tasks)}; task {model.task} has no served model yet",
        )
    task: ServedTask = model.task  # type: ignore[assignment]  # narrowed by the check above
    return task


def render_server_config(md: ModelDeployment, model: ResolvedModel) -> dict[str, Any]:
    """The ServerConfig for this deployment as a plain dict (camelCase keys), before validation."""
    spec = md.spec
    runtime = spec.runtime
    if model.uri is None:
        raise ServingBuildError("spec.model", "the model has not been resolved to a location yet")
    location = model_location(model.uri, "spec.model.uri")
    config: dict[str, Any] = {
        "version": "v1",
        "modelDir": location.path,
        "modelName": deployment_name(md),
        "task": served_task(model),
        "verifyManifest": md.spec.model.verify_manifest,
        "port": SERVER_PORT,
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "dtype": runtime.dtype,
        "quantization": {
            "method": spec.quantization.method,
            "maxQualityDrop": spec.quantization.max_quality_drop,
        },
        "pruning": {"method": spec.pruning.method, "maxQualityDrop": spec.pruning.max_quality_drop},
        "qualityGate": {"enabled": spec.quality_gate.enabled, "samples": spec.quality_gate.samples},
        "batching": {"maxBatchSize": runtime.max_batch_size, "maxWaitMs": runtime.max_wait_ms},
        "limits": {
            "maxNewTokens": runtime.max_new_tokens,
            "defaultMaxNewTokens": min(DEFAULT_MAX_NEW_TOKENS, runtime.max_new_tokens),
            "maxInputTokens": runtime.max_input_tokens,
            "maxQueuedRequests": runtime.max_queued_requests,
            "requestTimeoutSeconds": runtime.request_timeout_seconds,
        },
        "auth": {"mode": "api-keys", "apiKeysDir": API_KEYS_DIR} if spec.auth.enabled else {"mode": "none"},
        "feedback": {
            "enabled": spec.feedback.enabled,
            "dir": FEEDBACK_DIR,
            "retentionDays": spec.feedback.retention_days,
        },
        "faults": {"errorRate": runtime.fault_error_rate},
    }
    if model.encryption_key_secret_ref is not None:
        config["encryption"] = {"keyFile": ENCRYPTION_KEY_FILE}
    if spec.pruning.sparsity is not None:
        config["pruning"]["sparsity"] = spec.pruning.sparsity
    if model.base_model:
        config["baseModelDir"] = model_location(
            model.base_model, "spec.model.baseModel", BASE_MODEL_MOUNT
        ).path
    return config


def validated_server_config(md: ModelDeployment, model: ResolvedModel) -> ServerConfig:
    """The rendered config checked by the server's own model: what the operator applies is what the server
    accepts, or the error (naming the server's field) is raised here, before anything is applied."""
    try:
        return ServerConfig.model_validate(render_server_config(md, model))
    except ValidationError as exc:
        problems = "; ".join(
            f"{field_path(tuple(error['loc'])) or '<root>'}: {error['msg']}" for error in exc.errors()
        )
        raise ServingBuildError(
            "spec", f"the server refuses the config rendered from this spec: {problems}"
        ) from None


def server_config_json(md: ModelDeployment, model: ResolvedModel) -> str:
    """The validated config as the server reads it (camelCase JSON, every key written out)."""
    config = validated_server_config(md, model)
    # An unencrypted model's config stays byte-for-byte what it was before `encryption` existed: a new
    # key in every ConfigMap would roll out every deployment when the operator is upgraded.
    unused = {"encryption"} if config.encryption == Encryption() else None
    return json.dumps(
        config.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=unused),
        indent=2,
        sort_keys=True,
    )


def build_server_configmap(md: ModelDeployment, name: str, config_json: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": serving_metadata(md, name, "server-config"),
        "immutable": True,
        "data": {SERVER_CONFIG_FILE: config_json},
    }
