"""Reading a trainer artifact: its sha256 manifest, how it was trained (serving.json), its held-out sample.

The files are written by ``finetune_trainer.serving_files`` (the names are imported from there, so the two
sides cannot drift). An artifact without ``serving.json`` (a model from elsewhere) is served with the
config's ``task`` and no template; compressing it behind the gate needs a quality sample, so that is refused.
Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_server.errors import ArtifactError
from finetune_trainer.serving_files import MANIFEST_FILE, SERVING_FILE, file_sha256

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class QualityRow:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Artifact:
    directory: Path
    task: str
    #: The trainer's rendering of rows (``data.template``, ``data.fields.kind``, ``data.systemPrompt``).
    template: str | None = None
    row_kind: str | None = None
    system_prompt: str | None = None
    label_names: tuple[str, ...] | None = None
    quality_rows: tuple[QualityRow, ...] = ()
    verified_files: int = 0
    is_adapter: bool = False
    base_model: str | None = None
    serving: dict[str, Any] = field(default_factory=dict)


def verify_manifest(directory: Path) -> int:
    """Check every file against sha256sums.json; a missing, changed or unlisted file fails.

    Returns how many files were checked."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(
            f"verifyManifest: {directory} has no {MANIFEST_FILE} (set verifyManifest false to serve an "
            "artifact the trainer did not write)"
        )
    listed: dict[str, str] = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    present = {
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    }
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing or extra:
        raise ArtifactError(
            f"artifact {directory} does not match its manifest: missing {missing}, unlisted {extra}"
        )
    for name, digest in listed.items():
        if file_sha256(directory / name) != digest:
            raise ArtifactError(
                f"artifact file {name} in {directory} does not match its sha256 in {MANIFEST_FILE}"
            )
    return len(listed)


def _quality_rows(directory: Path, serving: dict[str, Any]) -> tuple[QualityRow, ...]:
    sample = serving.get("qualitySample") or {}
    name = sample.get("file")
    if not name:
        return ()
    rows = []
    with (directory / name).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(QualityRow(tuple(data["input_ids"]), tuple(data["labels"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(f"{name} line {number}: not an encoded example ({exc})") from exc
    return tuple(rows)


def read_artifact(directory: Path, *, task: str | None, verify: bool) -> Artifact:
    """The artifact at ``directory`` (the config's ``modelDir``), verified when asked to."""
    if not directory.is_dir():
        raise ArtifactError(f"modelDir: {directory} is not a folder")
    verified = verify_manifest(directory) if verify else 0
    serving_path = directory / SERVING_FILE
    serving: dict[str, Any] = (
        json.loads(serving_path.read_text(encoding="utf-8")) if serving_path.is_file() else {}
    )
    trained_task = serving.get("task")
    if task and trained_task and task != trained_task:
        raise ArtifactError(f"task: the config says {task} but the artifact was trained for {trained_task}")
    resolved = task or trained_task
    if not resolved:
        raise ArtifactError(f"task: {directory} has no {SERVING_FILE}; set task in the server config")
    adapter_path = directory / ADAPTER_CONFIG
    adapter = json.loads(adapter_path.read_text(encoding="utf-8")) if adapter_path.is_file() else None
    labels = serving.get("labelNames")
    return Artifact(
        directory=directory,
        task=resolved,
        template=serving.get("template"),
        row_kind=serving.get("rowKind"),
        system_prompt=serving.get("systemPrompt"),
        label_names=tuple(labels) if labels else None,
        quality_rows=_quality_rows(directory, serving),
        verified_files=verified,
        is_adapter=adapter is not None,
        base_model=(adapter or {}).get("base_model_name_or_path"),
        serving=serving,
    )


def served_task(directory: Path, configured: str | None) -> str:
    """The task to serve: the config's, else the one serving.json records (before anything is loaded)."""
    if configured:
        return configured
    path = directory / SERVING_FILE
    task = json.loads(path.read_text(encoding="utf-8")).get("task") if path.is_file() else None
    if not task:
        raise ArtifactError(f"task: {directory} has no {SERVING_FILE}; set task in the server config")
    return str(task)
