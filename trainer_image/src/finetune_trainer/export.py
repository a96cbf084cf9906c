"""The job's outputs, written by rank 0 after training.

Layout of ``output.dir`` (the contract with the inference server and the operator)::

    model/               the task's artifact (TrainingTask.export): for the Hugging Face tasks the model
                         (safetensors) + tokenizer/processor, the full fine-tune or the base with the LoRA
                         adapter merged (method lora/qlora with mergeAdapter)
    adapter/             LoRA adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
                         The served folder (the one export returned) also holds serving.json (the template
                         the job trained with), quality_sample.jsonl (held-out rows for the server's quality
                         gate) and sha256sums.json (finetune_trainer.serving_files)
    metrics.json         before/after metrics on validation and test, best step, steps, history, samples
    README.md            model card (data, hyperparameters, metrics, loss curve, the task's section and
                         the plots it draws)
    loss_curve.png
    data_report.json     from data preparation
    provenance.json      from data preparation, plus the trainer's own record (trainer_provenance.json)
    trainer_config.json  the config this run used
    metrics.jsonl        the metrics log

With ``output.copyTo`` set, rank 0 then copies all of it there (finetune_trainer.output_copy) and the
artifact's ``uri`` and ``modelCard`` point at the copy; ``claimUri`` keeps the exported folder's address.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune_trainer.config import TrainerConfig
from finetune_trainer.state import TrainState

if TYPE_CHECKING:
    from finetune_trainer.distributed import Distributed
    from finetune_trainer.engine import Engine
    from finetune_trainer.tasks.base import TrainingTask


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def files_digest(directory: Path) -> tuple[str, int]:
    """SHA-256 over the files of ``directory`` (sorted by relative path, path and bytes), and their size."""
    digest = hashlib.sha256()
    size = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        size += path.stat().st_size
    return digest.hexdigest(), size


def output_address(cfg: TrainerConfig, name: str) -> str:
    """Where users find ``output.dir/name``: under ``output.uri`` when set, else the in-pod path."""
    if cfg.output.uri:
        return f"{cfg.output.uri.rstrip('/')}/{name}"
    return str(Path(cfg.output.dir) / name)


def copy_address(cfg: TrainerConfig, name: str) -> str | None:
    """Where users find the copy of ``output.dir/name`` (``output.copyToUri``, else ``output.copyTo``), or
    None when the outputs are not copied."""
    base = cfg.output.copy_address
    return f"{base.rstrip('/')}/{name}" if base else None


def artifact_address(cfg: TrainerConfig, name: str) -> str:
    """What the reported artifact points at: the copy when ``output.copyTo`` is set, else ``output.dir``."""
    return copy_address(cfg, name) or output_address(cfg, name)


def export_outputs(
    cfg: TrainerConfig,
    engine: Engine,
    dist: Distributed,
    task: TrainingTask,
    data: Any,
    state: TrainState,
    after: dict[str, dict[str, float]],
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Write the outputs (every rank must call it: ZeRO-3 gathers weights collectively)."""
    state_dict = engine.full_state_dict()
    artifact: dict[str, Any] | None = None
    if dist.is_main:
        assert state_dict is not None
        artifact = _write(cfg, engine, task, data, state, after, state_dict, samples or [])
    dist.barrier()
    return artifact


def _write(
    cfg: TrainerConfig,
    engine: Engine,
    task: TrainingTask,
    data: Any,
    state: TrainState,
    after: dict[str, dict[str, float]],
    state_dict: dict[str, torch.Tensor],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    from finetune_trainer.model_card import write_model_card
    from finetune_trainer.serving_files import SERVING_FILE, write_serving_files

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    exported = task.export(engine.module, state_dict, out, data)
    artifact_dir, artifact_format = exported.directory, exported.format
    if not (artifact_dir / SERVING_FILE).is_file():  # a task that writes its own also wrote the manifest
        write_serving_files(artifact_dir, cfg, data)
    sha256, size = files_digest(artifact_dir)
    artifact = {
        "uri": artifact_address(cfg, artifact_dir.name),
        "format": artifact_format,
        "sizeBytes": size,
        "sha256": sha256,
        "modelCard": artifact_address(cfg, "README.md"),
        # The export itself stays where it was written (the checkpoint claim), also when it was copied.
        "claimUri": output_address(cfg, artifact_dir.name),
    }
    metrics = {
        "task": task.name,
        "before": state.before,
        "after": after,
        "bestStep": state.best_step,
        "bestMetric": state.best_metric,
        "metric": cfg.early_stopping.metric.value if cfg.early_stopping.enabled else "loss",
        "steps": state.step,
        "totalSteps": state.total_steps,
        "stoppedEarly": state.stopped_early,
        "history": state.history,
        "samples": samples,
        "artifact": artifact,
    }
    # The task's card section; the plots and reports it draws land under out/ next to the card.
    task_section = task.card_section(metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (out / "trainer_config.json").write_text(json.dumps(cfg.to_file_dict(), indent=1), encoding="utf-8")
    provenance = {
        "task": task.name,
        "baseModel": cfg.model.path,
        "revision": cfg.model.revision,
        "method": cfg.method.value,
        # Of the effective config, defaults included: the same run spelled two ways has one digest.
        "configSha256": hashlib.sha256(
            json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
        ).hexdigest(),
        "artifactSha256": sha256,
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "peft", "deepspeed")},
        },
    }
    (out / "trainer_provenance.json").write_text(json.dumps(provenance, indent=1), encoding="utf-8")
    write_model_card(cfg, out, data.report, metrics, task_section=task_section)
    return artifact
