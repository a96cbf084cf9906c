"""What the trainer leaves in the artifact for the inference server (read by finetune_server.artifact).

Written into the artifact folder (``model/``, or ``adapter/`` when the adapter is not merged) before its
digest is taken::

    serving.json          how the job rendered its rows (task, template, row kind, system prompt, EOS,
                          class names), so the server renders requests the same way
    quality_sample.jsonl  held-out examples as the trainer encoded them ({"input_ids", "labels"}; labels -100
                          where no loss was taken, one class id for classification): the quality gate's data
    sha256sums.json       {"files": {relative path: sha256}} of every other file in the folder

Torch-free: only the encoded examples' integer lists are read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig

SERVING_FILE = "serving.json"
QUALITY_SAMPLE_FILE = "quality_sample.jsonl"
MANIFEST_FILE = "sha256sums.json"
SERVING_FORMAT_VERSION = 1
#: Held-out examples kept for the server's quality gate (it reads the first ``qualityGate.samples``).
QUALITY_SAMPLE_ROWS = 256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def held_out_examples(data: Any, limit: int = QUALITY_SAMPLE_ROWS) -> tuple[str, list[Mapping[str, Any]]]:
    """The test split when there is one, else validation: the split's name and its first ``limit`` rows."""
    for split in ("test", "validation"):
        rows = list(getattr(data, split, None) or [])
        if rows:
            return split, rows[:limit]
    return "none", []


def write_serving_files(directory: Path, cfg: TrainerConfig, data: Any) -> None:
    """serving.json and quality_sample.jsonl, then the manifest over the whole folder."""
    label_names: Sequence[str] | None = getattr(data, "label_names", None)
    split, examples = held_out_examples(data)
    # Only token examples make a quality sample (the gate measures token models); an image task's examples
    # are not encoded ids, so its artifact ships none and the server refuses to compress it behind a gate.
    encoded = not examples or "input_ids" in examples[0]
    if encoded:
        with (directory / QUALITY_SAMPLE_FILE).open("w", encoding="utf-8") as out:
            for example in examples:
                row = {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
                out.write(json.dumps(row, separators=(",", ":")) + "\n")
    serving = {
        "version": SERVING_FORMAT_VERSION,
        "task": cfg.task.value,
        "template": cfg.data.template,
        "rowKind": cfg.data.fields.kind,
        "systemPrompt": cfg.data.system_prompt,
        "addEos": cfg.data.add_eos,
        "labelNames": list(label_names) if label_names is not None else None,
        "qualitySample": (
            {"file": QUALITY_SAMPLE_FILE, "split": split, "rows": len(examples)} if encoded else None
        ),
    }
    (directory / SERVING_FILE).write_text(json.dumps(serving, indent=1), encoding="utf-8")
    write_manifest(directory)


def write_manifest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but the manifest itself, written to sha256sums.json."""
    files = {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    return files
