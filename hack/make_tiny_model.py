#!/usr/bin/env python3
"""Make a tiny causal LM and a small generated dataset for the demo and the end-to-end tests (no downloads).

The model is a randomly initialised Llama-style network (2 layers, hidden 64) with the character-level
tokenizer of the trainer tests, saved in Hugging Face format; the data is the trainer tests' learnable task
(`{"prompt": "word: kqzt\\nfirst:", "completion": " K"}`), so a few dozen steps visibly lower the loss. Both
come from trainer_image/tests/trainer_fixtures.py, so the demo trains on exactly what the trainer's own
tests train on.

    make_tiny_model.py OUT_DIR [--rows N] [--malformed-ratio R]   ->  OUT_DIR/model/, OUT_DIR/data.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER_TESTS = REPO_ROOT / "trainer_image" / "tests"


@dataclass(frozen=True)
class TinyAssets:
    model_dir: Path
    data_path: Path


def _fixtures() -> object:
    if str(TRAINER_TESTS) not in sys.path:
        sys.path.insert(0, str(TRAINER_TESTS))
    import trainer_fixtures  # type: ignore[import-not-found]

    return trainer_fixtures


def make_tiny_assets(
    out: Path, *, rows: int = 240, malformed_ratio: float = 0.0, seed: int = 0
) -> TinyAssets:
    """Write the model and the data under `out`. With `malformed_ratio`, that fraction of the lines is
    replaced by broken JSON or rows without the mapped fields (for the bad-data path)."""
    fixtures = _fixtures()
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        fixtures.make_tiny_model(model_dir, seed=seed)  # type: ignore[attr-defined]
    data_path: Path = fixtures.make_task_data(out / "data.jsonl", rows=rows, seed=seed)  # type: ignore[attr-defined]
    if malformed_ratio > 0:
        lines = data_path.read_text(encoding="utf-8").splitlines()
        rng = random.Random(seed)
        broken = rng.sample(range(len(lines)), round(len(lines) * malformed_ratio))
        for n, index in enumerate(broken):
            lines[index] = (
                '{"prompt": "word: unterminated' if n % 2 else json.dumps({"question": "no fields"})
            )
        data_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TinyAssets(model_dir=model_dir, data_path=data_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--malformed-ratio", type=float, default=0.0)
    args = parser.parse_args(argv)
    assets = make_tiny_assets(args.out.resolve(), rows=args.rows, malformed_ratio=args.malformed_ratio)
    print(f"model: {assets.model_dir}\ndata:  {assets.data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
