"""The server pods: one revision (pod template + server config, named by their digest) and the
Deployments that run it, `NAME` for the stable revision and `NAME-canary` for one under test."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.modeldeployment import VLLM_QUANTIZATION, ModelDeployment, ResolvedModel
from finetune_operator.builders.encryption import encryption_key_volume
from finetune_operator.builders.pods import container_resources, placement
from finetune_operator.builders.security import (
    container_security_context,
    pod_security_context,
    scratch_env,
    scratch_mount,
    scratch_volume,
)
from finetune_operator.builders.server_config import (
    API_KEYS_DIR,
    BASE_MODEL_MOUNT,
    FEEDBACK_DIR,
    MODEL_MOUNT,
    SERVER_CONFIG_DIR,
    SERVER_CONFIG_FILE,
    ServingBuildError,
    model_location,
    server_config_json,
)
from finetune_operator.builders.serving_common import (
    PORT_NAME,
    REVISION_LABEL,
    ROLE_LABEL,
    SERVER_CONTAINER,
    SERVER_PORT,
    Role,
    api_keys_secret_key,
    api_keys_secret_name,
    deployment_name,
    feedback_claim_name,
    role_selector,
    server_config_name,
    server_deployment_name,
    serving_labels,
    serving_metadata,
)
from finetune_operator.config import OperatorConfig

SERVER_COMMAND = ["python", "-m", "finetune_server"]
VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16"}
PRESTOP_SLEEP_SECONDS = 5
"""A terminating pod keeps serving this long, so the Service stops sending it requests before it stops:
no request fails in a rollout."""
REVISION_DIGEST_LENGTH = 10
_CONFIG_PLACEHOLDER = "<server-config>"


@dataclass(frozen=True)
class ServingRevision:
    """What one revision's pods run."""

    name: str
    """Digest of the pod template and the server config: any change of either is a new revision."""
    template: dict[str, Any]
    """The pod template (labels include the revision; the role label is added per Deployment)."""
    config_json: str | None
    """The validated server config (built-in runtime), carried by the ConfigMap `config_name`."""
    config_name: str | None
    model_uri: str | None


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def _model_volumes(
    model: ResolvedModel, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> tuple[str | None, str | None]:
    """Mount the claims a `pvc://` model (and base model) live on; return the model and base paths."""
    paths: list[str | None] = []
    for uri, field, mount, volume in (
        (model.uri, "spec.model.uri", MODEL_MOUNT, "model"),
        (model.base_model, "spec.model.baseModel", BASE_MODEL_MOUNT, "base-model"),
    ):
        if uri is None or uri.startswith("hf://"):
            paths.append(uri.removeprefix("hf://") if uri else None)
            continue
        location = model_location(uri, field, mount)
        if location.claim:
            volumes.append(
                {"name": volume, "persistentVolumeClaim": {"claimName": location.claim, "readOnly": True}}
            )
            mounts.append({"name": volume, "mountPath": mount, "readOnly": True})
        paths.append(location.path)
    return paths[0], paths[1]


def _builtin_container(
    md: ModelDeployment, model: ResolvedModel, config: OperatorConfig, volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": SERVER_CONFIG_DIR, "readOnly": True}]
    volumes.append({"name": "config", "configMap": {"name": _CONFIG_PLACEHOLDER}})
    _model_volumes(model, volumes, mounts)
    if md.spec.auth.enabled:
        key = api_keys_secret_key(md)
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": api_keys_secret_name(md), "items": [{"key": key, "path": key}]},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    if model.encryption_key_secret_ref is not None:
        volume, mount = encryption_key_volume(model.encryption_key_secret_ref)
        volumes.append(volume)
        mounts.append(mount)
    if md.spec.feedback.enabled:
        volumes.append({"name": "feedback", "persistentVolumeClaim": {"claimName": feedback_claim_name(md)}})
        mounts.append({"name": "feedback", "mountPath": FEEDBACK_DIR})
    return {
        "name": SERVER_CONTAINER,
        "image": md.spec.runtime.image or config.server_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(SERVER_COMMAND),
        "args": ["--config", f"{SERVER_CONFIG_DIR}/{SERVER_CONFIG_FILE}"],
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        # Liveness answers while the weights load; readiness only once the model passed the quality gate.
        "livenessProbe": _http_probe("/v2/health/live", 10, 6),
        "readinessProbe": _http_probe("/v2/health/ready", 2, 3),
        "resources": container_resources(md.spec.resources, md.spec.resources.gpus),
        "volumeMounts": mounts,
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def vllm_args(md: ModelDeployment, model_path: str, revision: str | None) -> list[str]:
    """vLLM's OpenAI server flags for this spec; what vLLM can't do the API refuses already (CEL), and the
    mapping here refuses anything else rather than drop it."""
    runtime = md.spec.runtime
    method = md.spec.quantization.method
    if method not in VLLM_QUANTIZATION:
        raise ServingBuildError("spec.quantization.method", f"vllm can't apply {method}")
    if runtime.dtype not in VLLM_DTYPES:
        raise ServingBuildError("spec.runtime.dtype", f"vllm can't serve {runtime.dtype}")
    args = [
        "--model", model_path,
        "--served-model-name", deployment_name(md),
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--dtype", VLLM_DTYPES[runtime.dtype],
        "--max-num-seqs", str(runtime.max_batch_size),
        "--max-model-len", str(runtime.max_input_tokens + runtime.max_new_tokens),
    ]  # fmt: skip
    flag = VLLM_QUANTIZATION[method]
    if flag:
        args += ["--quantization", flag]
    if revision:
        args += ["--revision", revision]
    return args


def _vllm_container(
    md: ModelDeployment, model: ResolvedModel, config: OperatorConfig, volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}})
    uri = model.uri or ""
    revision = None
    if uri.startswith("hf://") and "@" in uri:
        uri, revision = uri.split("@", 1)
    path, _ = _model_volumes(model.model_copy(update={"uri": uri}), volumes, mounts)
    env: list[dict[str, Any]] = []
    if md.spec.auth.enabled:
        # vLLM takes one key, read at start: rotating it restarts the pods (a new revision).
        ref = {"name": api_keys_secret_name(md), "key": api_keys_secret_key(md)}
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": md.spec.runtime.image or config.vllm_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(VLLM_COMMAND),
        "args": vllm_args(md, path or "", revision),
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        # vLLM answers /health only once the weights are loaded, which can take many minutes.
        "startupProbe": _http_probe("/health", 10, 180),
        "livenessProbe": _http_probe("/health", 10, 6),
        "readinessProbe": _http_probe("/health", 2, 3),
        "resources": container_resources(md.spec.resources, md.spec.resources.gpus),
        "volumeMounts": mounts,
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env:
        container["env"] = env
    return container


def _restricted(container: dict[str, Any], volumes: list[dict[str, Any]]) -> None:
    """Either runtime's container under the `restricted` Pod Security Standard: its root filesystem is
    read-only, so what the server writes besides the feedback volume (HOME, temporary files such as the
    ONNX export, model and compile caches) goes to the scratch emptyDir."""
    container["env"] = [*scratch_env(), *container.get("env", [])]
    container["volumeMounts"].append(scratch_mount())
    container["securityContext"] = container_security_context()
    volumes.append(scratch_volume())


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:REVISION_DIGEST_LENGTH]


def build_revision(md: ModelDeployment, model: ResolvedModel, config: OperatorConfig) -> ServingRevision:
    """The revision this spec asks for (raises `ServingBuildError` naming the field it can't serve)."""
    volumes: list[dict[str, Any]] = []
    builtin = md.spec.runtime.type == "builtin"
    config_json = server_config_json(md, model) if builtin else None
    container = (_builtin_container if builtin else _vllm_container)(md, model, config, volumes)
    _restricted(container, volumes)
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
        # The server needs no Kubernetes API: no token in its pods.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # In-flight requests finish after SIGTERM (the server drains), then the pod goes.
        "terminationGracePeriodSeconds": md.spec.runtime.request_timeout_seconds + PRESTOP_SLEEP_SECONDS + 5,
        **placement(md.spec.resources, md.spec.resources.gpus),
    }
    revision = _digest({"config": config_json, "pod": pod_spec})
    config_name = server_config_name(md, revision) if builtin else None
    for volume in volumes:
        if volume.get("configMap", {}).get("name") == _CONFIG_PLACEHOLDER:
            volume["configMap"]["name"] = config_name
    labels = {**serving_labels(md, "server"), REVISION_LABEL: revision}
    template = {
        "metadata": {
            "labels": labels,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(SERVER_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }
    return ServingRevision(revision, template, config_json, config_name, model.uri)


def build_server_deployment(
    md: ModelDeployment, revision: ServingRevision, role: Role, replicas: int | None
) -> dict[str, Any]:
    """The Deployment of `revision` in `role`; `replicas` None leaves the count to the autoscaler.

    Its rolling update surges one pod and never takes one away before its replacement is ready."""
    template = json.loads(json.dumps(revision.template))
    template["metadata"]["labels"][ROLE_LABEL] = role
    spec: dict[str, Any] = {
        "selector": {"matchLabels": role_selector(md, role)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 2,
        "progressDeadlineSeconds": 600,
        "template": template,
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": serving_metadata(
            md,
            server_deployment_name(md, role),
            "server",
            **{ROLE_LABEL: role, REVISION_LABEL: revision.name},
        ),
        "spec": spec,
    }


__all__ = ["ServingRevision", "build_revision", "build_server_deployment", "vllm_args"]
