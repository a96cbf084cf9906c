"""One rank's data preparation in its own process, for the sharing tests:
``python data_rank.py CONFIG_JSON STORE ATTEMPT {prepare|wait} WORKDIR [--hold]``.

Prints one JSON line (examples, the cache entry, whether it waited; for object-detection data, the images
with their boxes and the published folder) and, with ``--hold``, then sleeps
until killed (a rank that goes on to train). Logs to stderr at INFO, as the trainer does."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.detection import prepare_detection
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import prepare
from tiny_tokenizer import make_tiny_tokenizer


def _text(cfg: DataConfig, store: Path, attempt: str, wait: bool, workdir: Path) -> dict[str, Any]:
    prepared = prepare(cfg, make_tiny_tokenizer(), workdir, store=store, attempt=attempt, wait=wait)
    cache = prepared.report.cache
    assert cache is not None
    return {
        "train": [e["input_ids"] for e in prepared.train],
        "validation": len(prepared.validation),
        "key": cache.key,
        "folder": cache.folder,
        "reused": cache.reused,
    }


def _detection(cfg: DataConfig, store: Path, attempt: str, wait: bool, workdir: Path) -> dict[str, Any]:
    prepared = prepare_detection(cfg, workdir, store=store, attempt=attempt, wait=wait)
    return {
        "train": prepared.train,
        "validation": prepared.validation,
        "categories": prepared.category_names,
        "report": prepared.report.model_dump(mode="json", by_alias=True),
        "folder": str(prepared.folder),
    }


def main(argv: list[str]) -> int:
    config, store, attempt, role, workdir = argv[:5]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DataConfig.model_validate(json.loads(config))
    started = time.monotonic()
    try:
        if cfg.fields.kind == "object-detection":
            result = _detection(cfg, Path(store), attempt, role == "wait", Path(workdir))
        else:
            result = _text(cfg, Path(store), attempt, role == "wait", Path(workdir))
    except DataError as exc:
        print(json.dumps({"error": str(exc), "reason": exc.reason}), flush=True)
        return 4
    print(json.dumps({"seconds": time.monotonic() - started, **result}), flush=True)
    if "--hold" in argv:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
