"""One rank's data preparation in its own process, for the sharing tests:
``python data_rank.py CONFIG_JSON STORE ATTEMPT {prepare|wait} WORKDIR [--hold]``.

Prints one JSON line (examples, the cache entry, whether it waited) and, with ``--hold``, then sleeps
until killed (a rank that goes on to train). Logs to stderr at INFO, as the trainer does."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pipeline import prepare
from tiny_tokenizer import make_tiny_tokenizer


def main(argv: list[str]) -> int:
    config, store, attempt, role, workdir = argv[:5]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DataConfig.model_validate(json.loads(config))
    started = time.monotonic()
    try:
        prepared = prepare(
            cfg, make_tiny_tokenizer(), Path(workdir), store=Path(store), attempt=attempt, wait=role == "wait"
        )
    except DataError as exc:
        print(json.dumps({"error": str(exc), "reason": exc.reason}), flush=True)
        return 4
    cache = prepared.report.cache
    assert cache is not None
    print(
        json.dumps(
            {
                "seconds": time.monotonic() - started,
                "train": [e["input_ids"] for e in prepared.train],
                "validation": len(prepared.validation),
                "key": cache.key,
                "folder": cache.folder,
                "reused": cache.reused,
            }
        ),
        flush=True,
    )
    if "--hold" in argv:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
