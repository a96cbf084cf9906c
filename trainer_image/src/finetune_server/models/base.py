"""The served-model protocol (KServe's ``BaseKServeModel`` in spirit) and the load path every kind shares.

A served model has a ``name``, a ``task``, ``ready``, ``load()`` and ``health()``; each kind adds its
task's entry point (``generate`` for text generation, ``predict`` for classifiers) and is one module in
``finetune_server.models``, registered in :data:`finetune_server.models.MODEL_KINDS`.

Load, in order: resolve the device (a quantisation method on the wrong device fails here, before any
weight is read) → read and verify the artifact → load the Hugging Face model (a LoRA adapter is merged
into its base) → prune, measure, gate → quantise, measure, gate → ready. A failed gate leaves the model not
ready with reason ``QualityGateFailed`` and the measured figures in ``health()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from finetune_server.artifact import Artifact, read_artifact
from finetune_server.config import ConfigError, ServerConfig, resolve_device
from finetune_server.errors import ArtifactError, InvalidInputError, ModelNotReadyError, QualityGateError

log = logging.getLogger(__name__)

LoadPhase = Literal["Loading", "Ready", "Failed"]


@runtime_checkable
class ServedModel(Protocol):
    name: str
    task: ClassVar[str]

    @property
    def ready(self) -> bool: ...

    def load(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


@dataclass
class LoadStatus:
    phase: LoadPhase = "Loading"
    reason: str | None = None
    message: str | None = None
    device: str | None = None
    load_seconds: float | None = None
    size_bytes: int | None = None
    original_size_bytes: int | None = None
    results: list[Any] = field(default_factory=list)  # quality.GateResult, in order of the steps


class LoadedModel:
    """What every kind shares: config, status, the load path; subclasses set ``task`` and ``auto_class``."""

    task: ClassVar[str]
    #: The transformers Auto class name (``AutoModelForCausalLM``...).
    auto_class: ClassVar[str]

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = config.model_name
        self.status = LoadStatus()
        self.artifact: Artifact | None = None
        self.tokenizer: Any = None
        self.backend: Any = None
        self.lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.status.phase == "Ready"

    def require_ready(self) -> None:
        if self.status.phase == "Loading":
            raise ModelNotReadyError(f"model {self.name} is still loading")
        if self.status.phase == "Failed":
            raise ModelNotReadyError(f"model {self.name} is not served: {self.status.message}")

    def health(self) -> dict[str, Any]:
        s = self.status
        body: dict[str, Any] = {"name": self.name, "task": self.task, "ready": self.ready, "phase": s.phase}
        for key, value in (
            ("reason", s.reason),
            ("message", s.message),
            ("device", s.device),
            ("loadSeconds", s.load_seconds),
            ("sizeBytes", s.size_bytes),
            ("originalSizeBytes", s.original_size_bytes),
        ):
            if value is not None:
                body[key] = value
        body["quality"] = [r.as_json() for r in s.results]
        return body

    # ----------------------------------------------------------------------------------------------- load
    def load(self) -> None:
        """Load, compress and gate; never raises (the outcome is in ``status``)."""
        started = time.perf_counter()
        try:
            self._load()
        except ConfigError as exc:
            self._fail("InvalidConfig", str(exc))
        except ArtifactError as exc:
            self._fail("ArtifactInvalid", str(exc))
        except QualityGateError as exc:
            self._fail("QualityGateFailed", str(exc))
        except Exception as exc:  # a model that cannot load must say why in readiness, not kill the server
            log.exception("loading %s failed", self.name)
            self._fail("LoadFailed", f"{type(exc).__name__}: {exc}")
        else:
            self.status.phase = "Ready"
            log.info("model %s ready in %.1fs", self.name, time.perf_counter() - started)
        self.status.load_seconds = round(time.perf_counter() - started, 3)

    def _fail(self, reason: str, message: str) -> None:
        log.error("model %s not served (%s): %s", self.name, reason, message)
        self.status.phase, self.status.reason, self.status.message = "Failed", reason, message

    def _load(self) -> None:
        import torch

        from finetune_server import compression, quality
        from finetune_server.backends import TorchBackend, serialized_size

        config = self.config
        device = resolve_device(config, torch.cuda.is_available())
        self.status.device = device
        if config.threads and device == "cpu":
            torch.set_num_threads(config.threads)
        artifact = read_artifact(
            config.model_dir, task=config.task or self.task, verify=config.verify_manifest
        )
        self.artifact = artifact
        compressing = config.pruning.method != "none" or config.quantization.method != "none"
        gate = config.quality_gate.enabled and compressing
        rows = artifact.quality_rows[: config.quality_gate.samples]
        if gate and not rows:
            raise ArtifactError(
                f"qualityGate: the artifact in {config.model_dir} ships no held-out sample "
                "(quality_sample.jsonl), so compression cannot be measured; disable qualityGate to serve it "
                "unmeasured"
            )
        self.tokenizer = self._load_tokenizer(artifact)
        pad_id = int(self.tokenizer.pad_token_id)
        model = self._load_model(artifact, device)
        original = serialized_size(model)
        self.status.original_size_bytes = original
        metric_name, measure = quality.METRICS[self.task]
        baseline_backend = TorchBackend(model, size_bytes=original, device=device, causal=self.causal)
        current = measure(baseline_backend, rows, pad_id) if gate else 0.0

        def gated(
            step: str, method: str, backend: Any, max_drop: float, sparsity: float | None = None
        ) -> float:
            """Measure ``backend`` against the current figure, record, refuse above ``max_drop``."""
            value = measure(backend, rows, pad_id)
            result = quality.GateResult(
                step=step,
                method=method,
                metric=metric_name,
                baseline=current,
                value=value,
                quality_drop=quality.relative_drop(metric_name, current, value),
                max_quality_drop=max_drop,
                size_bytes=backend.size_bytes,
                original_size_bytes=original,
                sparsity=sparsity,
            )
            self.status.results.append(result)
            self._check(result)
            return value

        if config.pruning.method != "none":
            sparsity = compression.prune(model, config.pruning.method, config.pruning.target_sparsity)
            if gate:
                pruned = TorchBackend(model, size_bytes=original, device=device, causal=self.causal)
                max_drop = config.pruning.max_quality_drop
                current = gated("pruning", config.pruning.method, pruned, max_drop, round(sparsity, 4))

        context = compression.CompressionContext(
            config=config,
            device=device,
            model_dir=config.model_dir,
            reload=lambda **extra: self._from_pretrained(self._weights_dir(artifact), None, **extra),
            causal=self.causal,
            example_ids=torch.tensor([list(rows[0].input_ids[:16])] if rows else [[pad_id] * 8]),
        )
        backend = compression.quantize(model, context)
        if config.quantization.method != "none" and gate:
            gated("quantization", config.quantization.method, backend, config.quantization.max_quality_drop)
        self.status.size_bytes = backend.size_bytes
        self.backend = backend
        self.on_loaded()

    @staticmethod
    def _check(result: Any) -> None:
        if not result.passed:
            raise QualityGateError(
                f"{result.step} {result.method}: {result.metric} "
                f"{result.baseline:.4g} -> {result.value:.4g}, "
                f"a drop of {result.quality_drop:.2%} above {result.step}.maxQualityDrop "
                f"{result.max_quality_drop:.2%}"
            )

    causal: ClassVar[bool] = True

    def on_loaded(self) -> None:
        """Kind-specific set-up once the backend is ready."""

    # ---------------------------------------------------------------------------------- model and tokenizer
    def _weights_dir(self, artifact: Artifact) -> Path:
        if not artifact.is_adapter:
            return artifact.directory
        base = self.config.base_model_dir or (Path(artifact.base_model) if artifact.base_model else None)
        if base is None or not base.is_dir():
            raise ArtifactError(
                f"baseModelDir: the artifact is a LoRA adapter and its base model {artifact.base_model!r} is "
                "not a local folder; set baseModelDir"
            )
        return base

    def _load_tokenizer(self, artifact: Artifact) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(artifact.directory))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _from_pretrained(self, directory: Path, dtype: Any, **extra: Any) -> Any:
        import transformers

        auto: Any = getattr(transformers, self.auto_class)
        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        return auto.from_pretrained(str(directory), **kwargs, **extra)

    def _load_model(self, artifact: Artifact, device: str) -> Any:
        import torch

        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = names.get(self.config.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
        model = self._from_pretrained(self._weights_dir(artifact), dtype)
        if artifact.is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(artifact.directory)).merge_and_unload()
        model.eval()
        return model.to(device)


ModelFactory = Callable[[ServerConfig], LoadedModel]


def refuse_compression(config: ServerConfig, task: str) -> None:
    """Kinds served as trained (image and detection models): a quantization or pruning method is refused,
    naming the field, never skipped."""
    for name, method in (
        ("quantization.method", config.quantization.method),
        ("pruning.method", config.pruning.method),
    ):
        if method != "none":
            raise ConfigError(f"{name}: {method} is not available for {task} models; use none")


def decode_image(data: str, index: int) -> Any:
    """``inputs[index]``, a base64-encoded image file, as an RGB PIL image; a 400 naming the input when it
    is not one (bad base64, not an image, over PIL's decompression-bomb limit)."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        blob = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(blob)) as image:
            return image.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(
            f"inputs[{index}]: not a base64-encoded image file ({exc})", param=f"inputs[{index}]"
        ) from exc
