"""The model card: ``README.md`` with data, hyperparameters, metrics, a loss-curve PNG and the task's own
section (``TrainingTask.card_section``: what its metrics mean, samples, the plots it draws)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig

log = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"

#: The Hugging Face ``pipeline_tag`` of each task's artifact (none for recommendation).
PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "sequence-classification": "text-classification",
    "image-classification": "image-classification",
    "object-detection": "object-detection",
}


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> bool:
    """Train and validation loss against the step; False when there is nothing to plot."""
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="validation loss", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = ["| split | metric | before | after |", "| --- | --- | --- | --- |"]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    for split in ("validation", "test"):
        names = sorted(set(before.get(split, {})) | set(after.get(split, {})))
        for name in names:
            rows.append(
                f"| {split} | {name} | {_fmt(before.get(split, {}).get(name))} | "
                f"{_fmt(after.get(split, {}).get(name))} |"
            )
    return "\n".join(rows)


def hyperparameters_table(cfg: TrainerConfig) -> str:
    rows = ["| setting | value |", "| --- | --- |"]
    settings: dict[str, Any] = {"method": cfg.method.value}
    if cfg.method.value != "full":
        settings.update({f"lora.{k}": v for k, v in cfg.lora.model_dump(by_alias=True).items()})
    settings.update({k: v for k, v in cfg.hyperparameters.model_dump(by_alias=True).items() if v is not None})
    settings.update(
        {f"distributed.{k}": v for k, v in cfg.distributed.model_dump(mode="json", by_alias=True).items()}
    )
    settings["seed"] = cfg.seed
    for key, value in settings.items():
        rows.append(f"| {key} | {_fmt(value.value if hasattr(value, 'value') else value)} |")
    return "\n".join(rows)


def data_section(report: Any) -> str:
    try:
        from finetune_trainer.data.report import render_data_section

        return render_data_section(report)
    except Exception as exc:  # the card must still be written
        log.warning("data section unavailable: %s", exc)
        return "## Data\n\nSee `data_report.json`.\n"


def render_model_card(
    cfg: TrainerConfig,
    metrics: dict[str, Any],
    data_markdown: str,
    *,
    has_curve: bool,
    task_section: str = "",
) -> str:
    best = metrics.get("bestStep")
    artifact = metrics.get("artifact", {})
    task = cfg.task.value
    pipeline_tag = PIPELINE_TAGS.get(task)
    lines = [
        "---",
        f"base_model: {cfg.model.path}",
        f"license: {cfg.model.license or 'other'}",
        "library_name: transformers" if artifact.get("format") != "adapter" else "library_name: peft",
        *([f"pipeline_tag: {pipeline_tag}"] if pipeline_tag else []),
        f"tags: [finetune-operator, {task}, {cfg.method.value}]",
        "---",
        "",
        f"# {cfg.output.model_name or 'Fine-tuned ' + cfg.model.path.rsplit('/', 1)[-1]}",
        "",
        f"{task} fine-tune of `{cfg.model.path}` with method **{cfg.method.value}**, "
        f"{metrics.get('steps')} of {metrics.get('totalSteps')} planned optimizer steps"
        + (" (stopped early)" if metrics.get("stoppedEarly") else "")
        + (f"; the exported weights are from the best step, {best}." if best is not None else "."),
        "",
        "## Metrics",
        "",
        "*Before* is the base model, *after* the exported model.",
        "",
        metrics_table(metrics),
        "",
    ]
    if task_section.strip():
        lines += [task_section.strip(), ""]
    if has_curve:
        lines += ["## Loss curve", "", f"![loss curve]({LOSS_CURVE})", ""]
    lines += ["## Training", "", hyperparameters_table(cfg), "", data_markdown.strip(), ""]
    lines += [
        "## Files",
        "",
        f"`{Path(str(artifact.get('claimUri') or 'model')).name}/` the exported model; "
        "`adapter/` the LoRA adapter (LoRA/QLoRA); "
        "`metrics.json`, `data_report.json`, `provenance.json`, `trainer_provenance.json`, "
        "`trainer_config.json`, `metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    cfg: TrainerConfig, out: Path, report: Any, metrics: dict[str, Any], *, task_section: str = ""
) -> Path:
    has_curve = plot_loss_curve(metrics.get("history", []), out / LOSS_CURVE)
    path = out / "README.md"
    path.write_text(
        render_model_card(cfg, metrics, data_section(report), has_curve=has_curve, task_section=task_section),
        encoding="utf-8",
    )
    return path
