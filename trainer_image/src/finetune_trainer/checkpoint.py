"""Checkpoints that survive a pod dying at any moment.

Layout under ``checkpointing.dir``::

    step-00000040/            a complete checkpoint (has COMPLETE)
        engine/ or engine.pt  model + optimizer + scheduler (DeepSpeed shards per rank, or one torch file)
        rng_state_<rank>.pt   python/numpy/torch/cuda RNG per rank
        trainer_state.json    step, epoch, data position, best metric, history, world size, data fingerprint
        manifest.json         files and sizes
        COMPLETE              written last; only checkpoints with it are ever resumed from
    step-00000050.tmp/        being written (or half-written by a killed run): ignored and removed

Commit protocol (every rank calls :meth:`CheckpointManager.save`): rank 0 clears ``<name>.tmp``; barrier;
every rank writes its files into it and fsyncs them; barrier; rank 0 writes the manifest, renames the
folder to its final name, writes ``COMPLETE`` (tmp file + ``os.replace``) and fsyncs the parent; barrier.
A crash before the marker leaves a folder without ``COMPLETE``, which resume skips and pruning removes.
The folder must be on storage shared by every rank (one PVC, ReadWriteMany for multi-node jobs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_trainer.distributed import Distributed, rng_state
from finetune_trainer.durable import fsync_path, write_text_atomically

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    def read_state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def load_rng(self, rank: int) -> dict[str, Any] | None:
        path = self.path / f"rng_state_{rank}.pt"
        if not path.is_file():
            return None
        return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under ``root``, oldest first. Half-written ones are not listed."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / MARKER).is_file() and (child / STATE_FILE).is_file():
            found.append(Checkpoint(int(match.group(1)), child))
    return sorted(found, key=lambda c: c.step)


class CheckpointManager:
    def __init__(self, root: Path, dist: Distributed, *, keep_last: int):
        self.root = root
        self.dist = dist
        self.keep_last = keep_last

    def latest(self) -> Checkpoint | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def find(self, step: int) -> Checkpoint | None:
        return next((c for c in complete_checkpoints(self.root) if c.step == step), None)

    def save(self, step: int, write_engine: Callable[[Path], None], state: dict[str, Any]) -> Checkpoint:
        """Write a checkpoint for ``step`` on every rank and commit it atomically (see module doc)."""
        final = self.root / checkpoint_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.dist.barrier()
        write_engine(tmp)
        torch.save(rng_state(), tmp / f"rng_state_{self.dist.rank}.pt")
        _fsync_tree(tmp)
        self.dist.barrier()
        if self.dist.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(
                json.dumps({"step": step, "worldSize": self.dist.world_size, "files": files}, indent=1),
                encoding="utf-8",
            )
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (resumed run, or best == last): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_text_atomically(final / MARKER, f"{step}\n")
            fsync_path(self.root)
        self.dist.barrier()
        return Checkpoint(step, final)

    def prune(self, *, keep_steps: set[int]) -> None:
        """Rank 0 removes complete checkpoints beyond the newest ``keep_last`` (except ``keep_steps``)
        and any half-written folder."""
        if not self.dist.is_main or not self.root.is_dir():
            return
        complete = complete_checkpoints(self.root)
        keep = {c.step for c in complete[-self.keep_last :]} | keep_steps
        for ckpt in complete:
            if ckpt.step not in keep:
                shutil.rmtree(ckpt.path, ignore_errors=True)
        complete_paths = {c.path for c in complete}
        for child in self.root.iterdir():
            half_written = child.name.startswith("step-") and child not in complete_paths
            if half_written and child.is_dir():
                log.info("removing half-written checkpoint %s", child)
                shutil.rmtree(child, ignore_errors=True)
