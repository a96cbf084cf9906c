"""Data preparation at scale: time, rows/s and peak memory of ``prepare()`` on N generated prompt/completion
rows, against a floor measured in the same run, plus a waiting rank and the reuse of the cache.

- floor: read the same JSONL and tokenize the same texts (prompt + newline + completion) in batches of 1000
  with the same tokenizer, nothing else (one process; the tokenizer's own threads as it likes them).
- prepare: ``prepare()`` with its defaults (NFKC + whitespace cleaning, PII scrubbing, exact de-duplication,
  5 %/5 % hash split, tokenization with loss masks) into a cache folder, as the trainer's preparing rank.
- waiting rank: a second process started at the same time with the same attempt token; it waits for the
  first and memory-maps its result, then reads 1000 examples.
- reuse: ``prepare()`` again in a new process, same config and data: the cache entry is found and mapped.

Every part runs in its own process so that each peak RSS is its own (``ru_maxrss``; the preparing process's
map workers are reported separately as the largest child). The tokenizer is the tests' character-level one
(``trainer_image/tests/tiny_tokenizer.py``: ~130 tokens a row, which makes tokenization the larger part).
``--near`` turns near-duplicate detection on (MinHash LSH; its index lives in memory) for a separate figure.
``--num-proc`` caps the map processes (``FTO_DATA_NUM_PROC``); ``--rows-per-process`` lowers the rows each
must get (``prepare(rows_per_process=…)``, default 20,000), to split a small run too; ``map_processes``
reports how many the tokenizing map used.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PATHS = [str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "model",
    "data",
    "train",
    "token",
    "value",
    "river",
    "stone",
    "light",
    "quick",
    "brown",
    "lazy",
    "fox",
    "answer",
    "question",
    "number",
    "city",
    "country",
    "water",
    "energy",
    "system",
    "market",
    "garden",
    "winter",
    "summer",
    "music",
    "paper",
]


def generate(path: Path, rows: int) -> None:
    """Rows like ``{"prompt": "Q17: eight words?", "completion": "eight words."}`` (~130 characters)."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(8))
            completion = " ".join(rng.choice(WORDS) for _ in range(8))
            handle.write(json.dumps({"prompt": f"Q{i}: {prompt}?", "completion": f"{completion}."}) + "\n")


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def _private_mb() -> float:
    """This process's private (anonymous) resident memory now. ``ru_maxrss`` also counts the file-backed pages
    of the memory-mapped examples file, which readahead brings in around random reads: shared page cache the
    kernel can drop, not memory the rank holds."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def worker_floor(source: str) -> dict[str, Any]:
    from tiny_tokenizer import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    start = time.perf_counter()
    tokens = rows = 0
    batch: list[str] = []
    with open(source, "rb") as handle:
        for line in handle:
            row = json.loads(line)
            batch.append(row["prompt"] + "\n" + row["completion"])
            if len(batch) == 1000:
                tokens += sum(len(ids) for ids in tokenizer(batch)["input_ids"])
                rows += len(batch)
                batch = []
    if batch:
        tokens += sum(len(ids) for ids in tokenizer(batch)["input_ids"])
        rows += len(batch)
    return {"seconds": time.perf_counter() - start, "rows": rows, "tokens": tokens, "peak_rss_mb": _peak_mb()}


def worker_prepare(
    source: str, store: str, attempt: str, wait: bool, near: bool, rows_per_process: int | None
) -> dict[str, Any]:
    from finetune_trainer.data.config import DataConfig
    from finetune_trainer.data.pipeline import prepare
    from tiny_tokenizer import make_tiny_tokenizer

    cfg = DataConfig.model_validate({"source": source, "maxSeqLength": 512, "dedup": {"near": near}})
    tokenizer = make_tiny_tokenizer()
    imported_mb = _peak_mb()
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        split = {} if rows_per_process is None else {"rows_per_process": rows_per_process}
        prepared = prepare(cfg, tokenizer, Path(work), store=Path(store), attempt=attempt, wait=wait, **split)
        seconds = time.perf_counter() - start
        rng = random.Random(1)
        read = [prepared.train[rng.randrange(len(prepared.train))] for _ in range(1000)]
        tokens = sum(len(e["input_ids"]) for e in read)
        cache = prepared.report.cache
        return {
            "seconds": seconds,
            "train": len(prepared.train),
            "validation": len(prepared.validation),
            "test": len(prepared.test),
            "sampled_tokens": tokens,
            "reused": bool(cache and cache.reused),
            "map_processes": len(list(prepared.folder.glob("examples*.arrow"))) if prepared.folder else 0,
            "peak_rss_mb": _peak_mb(),
            "private_rss_mb": _private_mb(),
            "after_imports_rss_mb": imported_mb,
            "largest_child_rss_mb": _peak_mb(resource.RUSAGE_CHILDREN),
            "stages": [[s.name, s.rows_in, s.rows_out] for s in prepared.report.stages],
        }


def _spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=7200)
    if process.returncode:
        raise SystemExit(f"worker failed ({process.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=None, help="processes for the maps")
    parser.add_argument("--near", action="store_true", help="near-duplicate detection on")
    parser.add_argument("--rows-per-process", type=int, default=None, help="fewest rows per map process")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path[:0] = PATHS
        kind, *rest = args.worker
        if kind == "floor":
            result = worker_floor(rest[0])
        else:
            wait = kind == "wait"
            result = worker_prepare(rest[0], rest[1], rest[2], wait, args.near, args.rows_per_process)
        print(json.dumps(result))
        return

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*PATHS, env.get("PYTHONPATH", "")])
    env.pop("TOKENIZERS_PARALLELISM", None)
    if args.num_proc:
        env["FTO_DATA_NUM_PROC"] = str(args.num_proc)
    num_proc = args.num_proc or len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="data-prep-bench-") as scratch:
        root = Path(scratch)
        source = root / "train.jsonl"
        generate(source, args.rows)
        floor = _result(_spawn("floor", str(source), env=env))
        store = str(root / "store")
        flags = ["--near"] if args.near else []
        if args.rows_per_process:
            flags += ["--rows-per-process", str(args.rows_per_process)]
        preparing = _spawn("prepare", str(source), store, "attempt-1", *flags, env=env)
        waiting = _spawn("wait", str(source), store, "attempt-1", *flags, env=env)
        prep, wait = _result(preparing), _result(waiting)
        reuse = _result(_spawn("prepare", str(source), store, "attempt-2", *flags, env=env))
        source_mb = source.stat().st_size / 2**20
    load_after = os.getloadavg()
    rows_per_s = args.rows / prep["seconds"]
    floor_rows_per_s = args.rows / floor["seconds"]
    print(
        json.dumps(
            {
                "benchmark": "data_prep",
                "rows": args.rows,
                "source_mb": round(source_mb, 1),
                "num_proc": num_proc,
                "rows_per_process": args.rows_per_process,
                "map_processes": prep["map_processes"],
                "near_dedup": args.near,
                "prep_s": round(prep["seconds"], 2),
                "prep_rows_per_s": round(rows_per_s),
                "prep_peak_rss_mb": prep["peak_rss_mb"],
                "prep_worker_peak_rss_mb": prep["largest_child_rss_mb"],
                "floor_s": round(floor["seconds"], 2),
                "floor_rows_per_s": round(floor_rows_per_s),
                "floor_peak_rss_mb": floor["peak_rss_mb"],
                "throughput_vs_floor": round(rows_per_s / floor_rows_per_s, 3),
                "waiting_rank_s": round(wait["seconds"], 2),
                "waiting_rank_peak_rss_mb": wait["peak_rss_mb"],
                "waiting_rank_private_rss_mb": wait["private_rss_mb"],
                "reuse_s": round(reuse["seconds"], 2),
                "reuse_peak_rss_mb": reuse["peak_rss_mb"],
                "reuse_private_rss_mb": reuse["private_rss_mb"],
                "reused": reuse["reused"],
                "examples": {k: prep[k] for k in ("train", "validation", "test")},
                "same_examples_everywhere": prep["sampled_tokens"]
                == wait["sampled_tokens"]
                == reuse["sampled_tokens"],
                "targets": {
                    "prep_peak_rss_mb": 1536,
                    "throughput_vs_floor": 0.5,
                    "reuse_s": 5,
                    "waiting_rank_peak_rss_mb": 300,
                },
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )


if __name__ == "__main__":
    main()
