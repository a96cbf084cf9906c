"""Per-step overhead of our training loop against a minimal hand-written PyTorch loop and a minimal
DeepSpeed loop: the same tiny Llama-style model, tokenized data, batch order and number of optimizer steps,
in one process.

Ours is the real ``finetune_trainer.loop.Trainer`` with its defaults (metrics every step to the JSON-lines
log, Prometheus gauges, loss read back every step); only evaluation and periodic checkpoints are turned off,
which the other loops don't do either. Steps/s are measured between the first and the last optimizer step
(the first step is warm-up), and each loop runs ``REPEATS`` times interleaved, alternating which goes first,
on one intra-op thread, so that load from other processes hits both alike. ``ratio`` is the median of the
back-to-back pair ratios (ours / plain); medians of each loop's steps/s and the pair-ratio range are
reported too.

Prints one JSON line: ours_steps_per_s, plain_steps_per_s, deepspeed_steps_per_s, ratio (ours / plain).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from finetune_trainer.config import parse_config  # noqa: E402
from finetune_trainer.data_order import DataOrder  # noqa: E402
from finetune_trainer.engine import lr_lambda  # noqa: E402
from finetune_trainer.env import TorchrunEnv  # noqa: E402
from finetune_trainer.loop import Trainer  # noqa: E402
from finetune_trainer.tasks.causal_lm import CausalLM  # noqa: E402
from trainer_fixtures import make_config, make_task_data, make_tiny_model  # noqa: E402

STEPS = 100
REPEATS = 7
MICRO_BATCH = 8


class TimedTrainer(Trainer):
    """Our trainer, recording when each optimizer step finishes."""

    def _train(self, state: Any) -> Any:
        self.step_times: list[float] = []
        original = self.engine.optimizer_step

        def timed() -> float | None:
            norm = original()
            self.step_times.append(time.perf_counter())
            return norm

        self.engine.optimizer_step = timed  # type: ignore[method-assign]
        return super()._train(state)


def steps_per_second(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def run_ours(root: Path, raw: dict[str, Any], attempt: int) -> tuple[float, list[dict[str, list[int]]]]:
    raw = json.loads(json.dumps(raw))
    raw["checkpointing"]["dir"] = str(root / f"ckpt-{attempt}")
    raw["output"]["dir"] = str(root / f"out-{attempt}")
    trainer = TimedTrainer(parse_config(raw), TorchrunEnv())
    try:
        trainer.run()
    finally:
        trainer.close()
    return steps_per_second(trainer.step_times), trainer.data.train


def batches(train: list[dict[str, list[int]]], seed: int) -> list[list[int]]:
    order = DataOrder(len(train), MICRO_BATCH, 1, 1, seed)
    out = []
    for step in range(STEPS):
        epoch, in_epoch = divmod(step, order.steps_per_epoch)
        out.append(order.micro_batches(order.permutation(epoch), in_epoch, 0)[0])
    return out


def run_plain(model_dir: Path, train: list[dict[str, list[int]]], raw: dict[str, Any], pad_id: int) -> float:
    from transformers import AutoModelForCausalLM

    cfg = parse_config(raw)
    hp = cfg.hyperparameters
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp, STEPS))
    times = []
    for indices in batches(train, cfg.seed):
        batch = CausalLM(pad_id).collate([train[i] for i in indices], torch.device("cpu"))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return steps_per_second(times)


def run_deepspeed(
    model_dir: Path, train: list[dict[str, list[int]]], raw: dict[str, Any], pad_id: int
) -> float:
    import deepspeed
    from transformers import AutoModelForCausalLM

    cfg = parse_config(raw)
    hp = cfg.hyperparameters
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    times = []
    for indices in batches(train, cfg.seed):
        batch = CausalLM(pad_id).collate([train[i] for i in indices], torch.device("cpu"))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter())
    return steps_per_second(times)


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    # One intra-op thread: on a shared machine two threads contend with other processes and the noise
    # swamps the per-step overhead being measured.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = make_tiny_model(root / "model")
        data = make_task_data(root / "data.jsonl", rows=600)
        raw = make_config(
            root,
            model_dir,
            data,
            hyperparameters={"maxSteps": STEPS, "microBatchSize": MICRO_BATCH},
            evaluation={"everySteps": 0, "beforeTraining": False},
            checkpointing={"everySteps": 10**6},
        )
        from transformers import AutoTokenizer

        pad_id = int(AutoTokenizer.from_pretrained(model_dir).pad_token_id)
        ours, plain = [], []
        train: list[dict[str, list[int]]] = []
        _, train = run_ours(root, raw, REPEATS)  # warm-up (imports, allocator); not counted
        for attempt in range(REPEATS):
            # Alternate which loop goes first, so drifting load from other processes hits both alike.
            if attempt % 2:
                plain.append(run_plain(model_dir, train, raw, pad_id))
                ours.append(run_ours(root, raw, attempt)[0])
            else:
                ours.append(run_ours(root, raw, attempt)[0])
                plain.append(run_plain(model_dir, train, raw, pad_id))
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        ds = [run_deepspeed(model_dir, train, raw, pad_id) for _ in range(REPEATS)]
    ours_s, plain_s, ds_s = statistics.median(ours), statistics.median(plain), statistics.median(ds)
    # Each (ours, plain) pair ran back to back under the same load: the median of the pair ratios is the
    # steadiest estimate of the overhead on a shared machine.
    pair_ratio = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    print(
        json.dumps(
            {
                "benchmark": "trainer_overhead",
                "ours_steps_per_s": round(ours_s, 2),
                "plain_steps_per_s": round(plain_s, 2),
                "deepspeed_steps_per_s": round(ds_s, 2),
                "ratio": round(pair_ratio, 3),
                "ratio_of_medians": round(ours_s / plain_s, 3),
                "ratio_min": round(min(o / p for o, p in zip(ours, plain, strict=True)), 3),
                "ratio_max": round(max(o / p for o, p in zip(ours, plain, strict=True)), 3),
                "deepspeed_ratio": round(ds_s / plain_s, 3),
                "target_ratio": 0.95,
                "steps": STEPS,
                "repeats": REPEATS,
                "micro_batch": MICRO_BATCH,
                "model": "llama hidden=64 layers=2 (random init), fp32, CPU",
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
