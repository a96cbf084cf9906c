"""The server's configuration (``python -m finetune_server --config PATH``): the contract with the operator.

Torch-free on purpose: the operator renders the server ConfigMap from a ModelDeployment and validates it with
:class:`ServerConfig` before applying it, and the operator never imports torch. Keys are camelCase in files
(snake_case accepted in Python); unknown keys are refused, naming the key and the closest valid one.

The names and values below are the ones the ModelDeployment API uses (``spec.runtime.dtype``,
``spec.quantization.method`` and so on); they are stable, change them only together with the API.

``dtype`` (:data:`Dtype`)
    ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``: the weights' compute dtype when a
    method does not impose one.

``device`` (:data:`Device`)
    ``auto`` (the CPU with a CPU quantisation method; else CUDA when the server sees a GPU, else the CPU),
    ``cpu``, ``cuda``.

``quantization.method`` (:data:`QuantizationMethod`; the device each needs in :data:`METHOD_DEVICES`)
    ``none``              no quantisation.
    ``int8-dynamic``      CPU. Dynamic int8: int8 weights, activations quantised per batch, for every linear
                          layer (GPT-2 style ``Conv1D`` included).
    ``onnx-int8``         CPU. Exported to ONNX, weights quantised to int8 by ONNX Runtime's dynamic
                          quantiser, served by ONNX Runtime.
    ``bnb-int8``          CUDA. bitsandbytes LLM.int8() at load.
    ``bnb-nf4``           CUDA. bitsandbytes 4-bit NormalFloat at load (compute in bf16).
    ``int4-weight-only``  CUDA. torchao int4 weight-only (group size 128).
    ``fp8-dynamic``       CUDA (compute capability 8.9 or newer). torchao fp8 weights and dynamic fp8
                          activations.
    A method on the wrong device is refused at once, naming ``quantization.method`` and the methods that
    would work there. CPU methods compute in fp32 (``dtype`` ``auto`` or ``fp32``).

``pruning.method`` (:data:`PruningMethod`)
    ``none``; ``magnitude`` (unstructured: the ``sparsity`` fraction of smallest-magnitude weights of every
    linear layer is zeroed); ``2:4`` (semi-structured: in every group of 4 consecutive weights of a row the 2
    smallest are zeroed, sparsity 0.5). Pruning runs before quantisation.

Quality gate (``qualityGate``, ``quantization.maxQualityDrop``, ``pruning.maxQualityDrop``)
    Each compression step is measured against the model it started from (pruning against the uncompressed
    model, quantisation against the pruned or uncompressed one) on the held-out sample the trainer ships in
    the artifact: perplexity for causal-lm, accuracy for sequence-classification. The drop is relative
    (0.01 = 1 % worse). Above a step's ``maxQualityDrop`` the server stays not ready (reason
    ``QualityGateFailed``) and says the measured figures in its readiness answer and its metrics.

``batching``
    ``maxBatchSize`` requests that arrive within ``maxWaitMs`` of each other run as one forward pass.

``limits``
    ``maxNewTokens`` (upper bound of ``max_tokens``; 400 above), ``defaultMaxNewTokens``, ``maxInputTokens``
    (413 above), ``maxRequestBytes`` (413 above), ``maxPredictInputs`` (413 above), ``maxQueuedRequests``
    (requests admitted and not finished; 429 with ``Retry-After`` above), ``requestTimeoutSeconds`` (a request
    past it is cancelled and answered 504).

``auth``
    ``mode`` ``api-keys`` (default): every route but health and metrics needs ``Authorization: Bearer KEY``
    with a key from ``apiKeysDir`` (a mounted Secret: every non-hidden file is read, one key per non-empty
    line; the folder is re-read every ``reloadSeconds``, so rotated keys work without a restart). ``none``:
    no authentication.

``feedback``
    ``enabled``: ``POST /v1/feedback`` appends to ``dir/feedback.jsonl`` and each generation is recorded in
    ``dir/requests.jsonl`` (so feedback can be joined with what was asked and answered); entries older than
    ``retentionDays`` are dropped at export.

``faults``
    ``errorRate``: fraction of inference requests answered 500 on purpose (to exercise canary rollback).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = [
    "CPU_METHODS",
    "CUDA_METHODS",
    "METHOD_DEVICES",
    "QUANTIZATION_METHODS",
    "Auth",
    "Batching",
    "ConfigError",
    "Device",
    "Dtype",
    "Encryption",
    "Faults",
    "Feedback",
    "Limits",
    "Pruning",
    "PruningMethod",
    "QualityGate",
    "Quantization",
    "QuantizationMethod",
    "ServedTask",
    "ServerConfig",
    "load_config",
    "parse_config",
    "resolve_device",
]

CONFIG_VERSION: Literal["v1"] = "v1"

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
QuantizationMethod = Literal[
    "none", "int8-dynamic", "onnx-int8", "bnb-int8", "bnb-nf4", "int4-weight-only", "fp8-dynamic"
]
PruningMethod = Literal["none", "magnitude", "2:4"]
ServedTask = Literal[
    "causal-lm", "sequence-classification", "image-classification", "object-detection", "recommendation"
]

QUANTIZATION_METHODS: tuple[QuantizationMethod, ...] = (
    "none",
    "int8-dynamic",
    "onnx-int8",
    "bnb-int8",
    "bnb-nf4",
    "int4-weight-only",
    "fp8-dynamic",
)
CPU_METHODS: frozenset[QuantizationMethod] = frozenset({"int8-dynamic", "onnx-int8"})
CUDA_METHODS: frozenset[QuantizationMethod] = frozenset(
    {"bnb-int8", "bnb-nf4", "int4-weight-only", "fp8-dynamic"}
)
#: The devices each quantisation method runs on.
METHOD_DEVICES: dict[QuantizationMethod, frozenset[Literal["cpu", "cuda"]]] = {
    method: frozenset({"cpu"})
    if method in CPU_METHODS
    else frozenset({"cuda"})
    if method in CUDA_METHODS
    else frozenset({"cpu", "cuda"})
    for method in QUANTIZATION_METHODS
}

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A config that cannot be served as written; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            valid = [key for name, info in cls.model_fields.items() for key in {info.alias or name, name}]
            for key in data:
                if isinstance(key, str) and key not in valid:
                    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                    preferred = ", ".join(sorted({k for k in valid if "_" not in k}))
                    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {preferred}"
                    raise PydanticCustomError("unknown_key", f"unknown key {key!r}{hint}")
        return data


class Quantization(_Section):
    """Post-training quantisation at load, behind the quality gate."""

    method: QuantizationMethod = Field("none", description="See the module docstring for each method.")
    max_quality_drop: Fraction = Field(
        0.02, description="Largest relative quality drop against the model before quantisation."
    )


class Pruning(_Section):
    """Magnitude pruning at load (before quantisation), behind the quality gate."""

    method: PruningMethod = Field("none", description="none, magnitude (unstructured) or 2:4.")
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Fraction of weights zeroed: required with magnitude; 0.5 (or unset) with 2:4."
    )
    max_quality_drop: Fraction = Field(
        0.02, description="Largest relative quality drop against the model before pruning."
    )

    @model_validator(mode="after")
    def _sparsity_fits_method(self) -> Pruning:
        if self.method == "magnitude" and not self.sparsity:
            raise ValueError("sparsity: set a fraction above 0 with method magnitude")
        if self.method == "2:4" and self.sparsity not in (None, 0.5):
            raise ValueError("sparsity: method 2:4 zeroes exactly half the weights; leave it unset or 0.5")
        if self.method == "none" and self.sparsity:
            raise ValueError("sparsity: needs a pruning method (magnitude or 2:4)")
        return self

    @property
    def target_sparsity(self) -> float:
        return 0.0 if self.method == "none" else 0.5 if self.method == "2:4" else float(self.sparsity or 0)


class QualityGate(_Section):
    """The measurement behind the gate: the held-out sample shipped in the artifact."""

    enabled: bool = Field(
        True, description="Measure compression before reporting ready (off: trust it unmeasured)."
    )
    samples: Annotated[int, Field(ge=1, le=100_000)] = Field(
        64, description="Rows of the artifact's held-out sample used (the first N)."
    )


class Batching(_Section):
    """Dynamic batching of concurrent requests."""

    max_batch_size: Annotated[int, Field(ge=1, le=256)] = Field(
        8, description="Requests batched into one forward pass."
    )
    max_wait_ms: Annotated[float, Field(ge=0.0, le=1000.0)] = Field(
        5.0, description="How long the first request of a batch waits for others to join it."
    )


class Limits(_Section):
    """Request limits; each refusal names the field."""

    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = Field(
        256, description="Upper bound of max_tokens (400 above)."
    )
    default_max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = Field(
        16, description="max_tokens when a request gives none."
    )
    max_input_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        2048, description="Longest prompt (or predict input) in tokens (413 above)."
    )
    max_request_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        1024 * 1024, description="Largest request body (413 above)."
    )
    max_predict_inputs: Annotated[int, Field(ge=1, le=10_000)] = Field(
        64, description="Most inputs in one /v1/predict request (413 above)."
    )
    max_queued_requests: Annotated[int, Field(ge=1, le=10_000)] = Field(
        32, description="Inference requests admitted and not finished; above it 429 with Retry-After."
    )
    request_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="A request running longer is cancelled and answered 504."
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> Limits:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("defaultMaxNewTokens: must not exceed maxNewTokens")
        return self


class Auth(_Section):
    """Bearer API keys from a mounted Secret."""

    mode: Literal["api-keys", "none"] = Field("api-keys", description="api-keys, or none (no auth).")
    api_keys_dir: Path = Field(
        Path("/etc/finetune-server/api-keys"),
        description="Folder of key files (a mounted Secret); one key per non-empty line.",
    )
    reload_seconds: Annotated[float, Field(ge=0.0, le=3600)] = Field(
        5.0, description="How often the folder is re-read (rotation without restart); 0: on every request."
    )


class Feedback(_Section):
    """Feedback on answers, stored as JSON lines on a volume."""

    enabled: bool = Field(False, description="Accept POST /v1/feedback and record generations.")
    dir: Path = Field(Path("/var/lib/finetune-server/feedback"), description="Folder on a volume.")
    retention_days: Annotated[int, Field(ge=1, le=3650)] = Field(
        30, description="Entries older than this are left out of exports."
    )
    max_correction_chars: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        16384, description="Longest correction accepted (413 above)."
    )


class Encryption(_Section):
    """An artifact the trainer encrypted at rest (``finetune_trainer.encryption``), decrypted at start."""

    key_file: Path | None = Field(
        None,
        description="File holding the 32-byte AES key the FineTuneJob encrypted with (a mounted Secret). "
        "Unset: an encrypted modelDir is refused, naming this field.",
    )
    decrypt_dir: Path | None = Field(
        None, description="Where the plaintext is written (default: a new folder under TMPDIR)."
    )


class Faults(_Section):
    """Deliberate faults, to exercise canary analysis and rollback."""

    error_rate: Fraction = Field(0.0, description="Fraction of inference requests answered 500.")


class ServerConfig(_Section):
    """What ``python -m finetune_server --config PATH`` reads."""

    version: Literal["v1"] = Field(CONFIG_VERSION, description="Schema version of this file.")
    model_dir: Path = Field(
        description="The artifact's model/ (Hugging Face model + tokenizer) or adapter/ (a LoRA adapter)."
    )
    base_model_dir: Path | None = Field(
        None, description="Base model to merge a LoRA adapter into (default: the adapter's own base path)."
    )
    model_name: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Name clients use in the `model` field and that /v1/models lists."
    )
    task: ServedTask | None = Field(
        None,
        description="causal-lm, sequence-classification, image-classification, object-detection or "
        "recommendation; default: the artifact's serving.json.",
    )
    verify_manifest: bool = Field(
        True, description="Check every file against the artifact's sha256 manifest; a missing one fails."
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="Port of the HTTP API.")
    device: Device = Field("auto", description="auto, cpu or cuda.")
    dtype: Dtype = Field("auto", description="auto, bf16, fp16 or fp32.")
    threads: Annotated[int, Field(ge=0, le=1024)] = Field(
        0, description="torch intra-op threads on CPU (0: torch's default)."
    )
    quantization: Quantization = Field(default_factory=Quantization)
    pruning: Pruning = Field(default_factory=Pruning)
    quality_gate: QualityGate = Field(default_factory=QualityGate)
    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    auth: Auth = Field(default_factory=Auth)
    feedback: Feedback = Field(default_factory=Feedback)
    faults: Faults = Field(default_factory=Faults)
    encryption: Encryption = Field(default_factory=Encryption)

    @model_validator(mode="after")
    def _fits_device_and_dtype(self) -> ServerConfig:
        if self.device != "auto":
            check_method_device(self.quantization.method, self.device)
        method = self.quantization.method
        if method in CPU_METHODS and self.dtype not in ("auto", "fp32"):
            raise ValueError(f"dtype: quantization.method {method} computes in fp32; set dtype auto or fp32")
        return self


def check_method_device(method: QuantizationMethod, device: Literal["cpu", "cuda"]) -> None:
    """Raise (naming ``quantization.method``) when ``method`` cannot run on ``device``."""
    if device in METHOD_DEVICES[method]:
        return
    there = sorted(m for m in QUANTIZATION_METHODS if device in METHOD_DEVICES[m])
    need = "/".join(sorted(METHOD_DEVICES[method]))
    raise ConfigError(
        f"quantization.method: {method} needs {need} but the server runs on {device}; "
        f"on {device} use one of {', '.join(there)}"
    )


def resolve_device(config: ServerConfig, cuda_available: bool) -> Literal["cpu", "cuda"]:
    """The device to serve on; refuses (ConfigError naming the field) what this machine cannot do."""
    if config.device == "cuda" and not cuda_available:
        raise ConfigError("device: cuda was asked for but this machine has no usable CUDA GPU")
    device: Literal["cpu", "cuda"]
    if config.device != "auto":
        device = config.device
    elif config.quantization.method in CPU_METHODS:
        device = "cpu"  # a CPU method asks for the CPU, also on a machine with a GPU
    else:
        device = "cuda" if cuda_available else "cpu"
    check_method_device(config.quantization.method, device)
    return device


def parse_config(data: Any) -> ServerConfig:
    """Validate a config mapping (pydantic's ValidationError names the field)."""
    return ServerConfig.model_validate(data)


def load_config(path: Path) -> ServerConfig:
    """Read a YAML or JSON config file."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return parse_config(data)
