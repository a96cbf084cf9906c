"""Per-step overhead of our training loop against a minimal hand-written PyTorch loop and a minimal
DeepSpeed loop: the same tiny Llama-style model, tokenized data, batch order and number of optimizer steps,
in one process.

Ours is the real ``finetune_trainer.loop.Trainer`` with its defaults (metrics every step to the JSON-lines
log, Prometheus gauges, loss read back every step); only evaluation and periodic checkpoints are turned off,
which the other loops don't do either. It reads the training examples by index from the prepared Arrow files,
as it does in a job; the plain and DeepSpeed loops read the same view, so ``ratio`` is the loop's own
overhead. The cost of reading from Arrow is measured apart: ours again, in the same run, with the examples
materialised from the same view into plain Python lists first (how the trainer held them before preparation
moved to Arrow), so before and after are side by side.

Steps/s are measured between the first and the last optimizer step (the first step is warm-up). The three
loops run back to back in ``--repeats`` rounds, rotating which goes first, on one intra-op thread, so that
load from other processes hits them alike (DeepSpeed's runs come after, apart: it needs a process group).
``ratio`` is the median over the rounds of ours / plain in steps/s (target: at least 0.95);
``arrow_vs_list`` the median over the rounds of the step time of ours reading Arrow / ours reading lists
("no worse": at most 1.05). Medians of each loop's figures and the ranges of the ratios are reported too.

Prints one JSON line: ours_steps_per_s, plain_steps_per_s, deepspeed_steps_per_s, ratio (ours / plain),
arrow_step_s, list_step_s, arrow_vs_list; and what reading the examples costs a step, timed around the reads
themselves in the same runs (``arrow_read_ms_per_step``, ``list_read_ms_per_step``) with the step-time ratio
that cost implies (``arrow_vs_list_from_reads``): on a loaded machine the difference of two step times is
mostly noise, the time inside the reads is not.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from finetune_trainer.tasks.causal_lm import collate_tokens  # noqa: E402
from trainer_fixtures import make_config, make_task_data, make_tiny_model  # noqa: E402

STEPS = 100
REPEATS = 7
MICRO_BATCH = 8


class TimedTrainer(Trainer):
    """Our trainer, recording when each optimizer step finishes; with ``examples_as_lists`` it reads the
    examples from Python lists materialised from the prepared Arrow view instead of the view itself."""

    examples_as_lists = False

    def _prepare_data(self, tokenizer: Any) -> Any:
        prepared = super()._prepare_data(tokenizer)
        if not self.examples_as_lists:
            return prepared
        return dataclasses.replace(
            prepared,
            train=list(prepared.train),
            validation=list(prepared.validation),
            test=list(prepared.test),
        )

    def _train_examples(self, indices: list[int]) -> list[Any]:
        start = time.perf_counter()
        examples = super()._train_examples(indices)
        self.read_seconds += time.perf_counter() - start
        return examples

    def _train(self, state: Any) -> Any:
        self.step_times: list[float] = []
        self.read_seconds = 0.0
        original = self.engine.optimizer_step

        def timed() -> float | None:
            norm = original()
            self.step_times.append(time.perf_counter())
            return norm

        self.engine.optimizer_step = timed  # type: ignore[method-assign]
        return super()._train(state)


def steps_per_second(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


@dataclasses.dataclass
class OursRun:
    steps_per_s: float
    #: Seconds spent reading the training examples (``Trainer._train_examples``), per optimizer step.
    read_s_per_step: float
    train: Any


def run_ours(root: Path, raw: dict[str, Any], run: str, *, lists: bool = False) -> OursRun:
    raw = json.loads(json.dumps(raw))
    raw["checkpointing"]["dir"] = str(root / f"ckpt-{run}")
    raw["output"]["dir"] = str(root / f"out-{run}")
    trainer = TimedTrainer(parse_config(raw), TorchrunEnv())
    trainer.examples_as_lists = lists
    try:
        trainer.run()
    finally:
        trainer.close()
    steps = len(trainer.step_times)
    return OursRun(steps_per_second(trainer.step_times), trainer.read_seconds / steps, trainer.data.train)


def batches(train: list[dict[str, list[int]]], seed: int, steps: int) -> list[list[int]]:
    order = DataOrder(len(train), MICRO_BATCH, 1, 1, seed)
    out = []
    for step in range(steps):
        epoch, in_epoch = divmod(step, order.steps_per_epoch)
        out.append(order.micro_batches(order.permutation(epoch), in_epoch, 0)[0])
    return out


def run_plain(model_dir: Path, train: list[dict[str, list[int]]], raw: dict[str, Any], pad_id: int) -> float:
    from transformers import AutoModelForCausalLM

    cfg = parse_config(raw)
    hp = cfg.hyperparameters
    steps = int(hp.max_steps or 0)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp, steps))
    times = []
    for indices in batches(train, cfg.seed, steps):
        batch = collate_tokens([train[i] for i in indices], pad_id, torch.device("cpu"))
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
    for indices in batches(train, cfg.seed, int(hp.max_steps or 0)):
        batch = collate_tokens([train[i] for i in indices], pad_id, torch.device("cpu"))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter())
    return steps_per_second(times)


def main() -> None:
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of each loop")
    args = parser.parse_args()
    steps, repeats = args.steps, args.repeats
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
            hyperparameters={"maxSteps": steps, "microBatchSize": MICRO_BATCH},
            evaluation={"everySteps": 0, "beforeTraining": False},
            checkpointing={"everySteps": 10**6},
        )
        from transformers import AutoTokenizer

        pad_id = int(AutoTokenizer.from_pretrained(model_dir).pad_token_id)
        train: list[dict[str, list[int]]] = []
        train = run_ours(root, raw, "warm-up").train  # imports, allocator, the prepared data; not counted
        reads: dict[str, list[float]] = {"ours": [], "lists": []}

        def ours_run(attempt: int, lists: bool) -> float:
            run = run_ours(root, raw, f"{'lists' if lists else 'arrow'}-{attempt}", lists=lists)
            reads["lists" if lists else "ours"].append(run.read_s_per_step)
            return run.steps_per_s

        loops = {
            "ours": lambda attempt: ours_run(attempt, False),
            "lists": lambda attempt: ours_run(attempt, True),
            "plain": lambda attempt: run_plain(model_dir, train, raw, pad_id),
        }
        measured: dict[str, list[float]] = {name: [] for name in loops}
        names = list(loops)
        for attempt in range(repeats):
            # Rotate which loop goes first, so drifting load from other processes hits all of them alike.
            for name in names[attempt % 3 :] + names[: attempt % 3]:
                measured[name].append(loops[name](attempt))
        ours, lists, plain = measured["ours"], measured["lists"], measured["plain"]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        ds = [run_deepspeed(model_dir, train, raw, pad_id) for _ in range(repeats)]
    ours_s, plain_s, ds_s = statistics.median(ours), statistics.median(plain), statistics.median(ds)
    # The loops of a round ran back to back under the same load: the median of the per-round ratios is the
    # steadiest estimate of the overhead on a shared machine.
    pair_ratio = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    # Step time reading Arrow / reading lists, per round (steps/s are the inverse).
    arrow_vs_list = [lst / arrow for arrow, lst in zip(ours, lists, strict=True)]
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
                "arrow_step_s": round(1 / ours_s, 5),
                "list_step_s": round(1 / statistics.median(lists), 5),
                "arrow_vs_list": round(statistics.median(arrow_vs_list), 3),
                "arrow_vs_list_min": round(min(arrow_vs_list), 3),
                "arrow_vs_list_max": round(max(arrow_vs_list), 3),
                "target_arrow_vs_list": 1.05,
                # What reading the examples costs a step, timed around the reads themselves (steadier than
                # the difference of two noisy step times): Arrow vs lists, and the step-time ratio it implies.
                "arrow_read_ms_per_step": round(statistics.median(reads["ours"]) * 1000, 3),
                "list_read_ms_per_step": round(statistics.median(reads["lists"]) * 1000, 3),
                "arrow_vs_list_from_reads": round(
                    1
                    + (statistics.median(reads["ours"]) - statistics.median(reads["lists"]))
                    * statistics.median(lists),
                    4,
                ),
                "steps": steps,
                "repeats": repeats,
                "micro_batch": MICRO_BATCH,
                "model": "llama hidden=64 layers=2 (random init), fp32, CPU",
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
