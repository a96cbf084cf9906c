"""bf16 ZeRO-3 on one GPU through ``python -m finetune_trainer`` (launcher -> torchrun -> worker), with a
~1.1B-parameter random-initialised Llama-style model (TinyLlama shape). Called by benchmarks/gpu_check.sh.

MFU convention (PaLM appendix B / torchtitan): model FLOPs per token = 6·N + 12·L·H·Q·T, where N is the
parameter count without the input embedding (lm_head is untied, so it counts), L layers, H heads, Q head
dim, T sequence length; no recompute, causal mask not discounted. Peak: 989 TFLOP/s (H100/H200 SXM dense
bf16). Throughput is the median of the per-step tokens/s the trainer logs (non-padding tokens), skipping
the first WARMUP steps. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]

STEPS = int(os.environ.get("STEPS", "40"))
WARMUP = 5
MICRO_BATCH = int(os.environ.get("MICRO_BATCH", "4"))
SEQ = int(os.environ.get("SEQ", "2048"))
PEAK_FLOPS = 989e12
#: Whole-script budget (gpu_check.sh kills at 295 s): the QLoRA phase only runs in what is left.
BUDGET_SECONDS = 280.0
STARTED = time.monotonic()
#: FTO_GPU_CHECK_SMOKE=1: a tiny shape on the CPU, to check the script without a GPU (figures meaningless).
SMOKE = os.environ.get("FTO_GPU_CHECK_SMOKE") == "1"
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
if SMOKE:
    SHAPE = {k: max(1, v // 32) for k, v in SHAPE.items()} | {
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
    }
    SEQ, STEPS, MICRO_BATCH = 128, 8, 2


def make_model(directory: Path) -> tuple[int, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_tokenizer import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        **SHAPE,  # type: ignore[arg-type]
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cpu" if SMOKE else "cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return total, total - embedding


def make_data(path: Path, rows: int) -> None:
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + "     "
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(SEQ * 2))}) + "\n")


def run_trainer(
    config: dict[str, Any], root: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    (root / "config.json").write_text(json.dumps(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image" / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "finetune_trainer", "--config", str(root / "config.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1.0))
        result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        import psutil  # type: ignore[import-untyped]

        # torchrun starts workers in their own sessions: kill the whole tree so no worker keeps the GPU.
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        _, stderr = proc.communicate()
        result = subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f}s\n{stderr}")
    events_path = Path(config["output"]["dir"]) / "metrics.jsonl"
    events = (
        [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    )
    return result, events


def qlora_smoke() -> dict[str, object]:
    """QLoRA (bitsandbytes 4-bit, ZeRO-2, bf16) on a small random model: it can't be covered on CPU CI."""
    try:
        import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return {"qlora": "skipped: bitsandbytes not installed (pip install -c constraints.txt '.[gpu]')"}
    left = BUDGET_SECONDS - (time.monotonic() - STARTED)
    if left < 75:
        return {"qlora": f"skipped: only {left:.0f}s of the time budget left"}
    global SHAPE
    saved = SHAPE
    SHAPE = {
        **SHAPE,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
    }
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
            root = Path(scratch)
            make_model(root / "model")
            make_data(root / "data.jsonl", 96)
            config = {
                "model": {"path": str(root / "model")},
                "data": {
                    "source": str(root / "data.jsonl"),
                    "fields": {"kind": "text"},
                    "maxSeqLength": 256,
                    "split": {"validation": 0.1, "test": 0.1},
                    "pii": {"policy": "allow"},
                },
                "method": "qlora",
                "lora": {"r": 8, "alpha": 16},
                "hyperparameters": {"maxSteps": 10, "microBatchSize": 4, "learningRate": 1e-3},
                "evaluation": {"everySteps": 5, "everyEpoch": False, "batchSize": 4, "maxBatches": 2},
                "checkpointing": {"dir": str(root / "ckpt"), "everySteps": 5, "saveOnEpochEnd": False},
                "distributed": {"zeroStage": 2, "precision": "bf16"},
                "output": {"dir": str(root / "out")},
                "reporting": {"metricsPort": 0},
            }
            result, events = run_trainer(config, root, timeout=BUDGET_SECONDS - (time.monotonic() - STARTED))
            done = [e for e in events if e["event"] == "done"]
            if result.returncode != 0 or not done:
                return {
                    "qlora": "failed",
                    "qlora_exit_code": result.returncode,
                    "qlora_error": result.stderr[-1500:],
                }
            return {
                "qlora": "ok",
                "qlora_after_test_loss": done[0].get("test_loss"),
                "qlora_adapter": (root / "out" / "adapter" / "adapter_model.safetensors").is_file(),
            }
    finally:
        SHAPE = saved


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        root = Path(scratch)
        total, non_embedding = make_model(root / "model")
        rows = int(STEPS * MICRO_BATCH * 1.15) + 64
        make_data(root / "data.jsonl", rows)
        config = {
            "version": "v1",
            "model": {"path": str(root / "model")},
            "data": {
                "source": str(root / "data.jsonl"),
                "fields": {"kind": "text"},
                "maxSeqLength": SEQ,
                "split": {"validation": 0.05, "test": 0.05},
                "dedup": {"exact": False},
                "pii": {"policy": "allow"},
            },
            "method": "full",
            "hyperparameters": {"maxSteps": STEPS, "microBatchSize": MICRO_BATCH, "learningRate": 1e-4},
            "evaluation": {
                "everySteps": 0,
                "everyEpoch": False,
                "beforeTraining": False,
                "batchSize": MICRO_BATCH,
                "maxBatches": 1,
            },
            "checkpointing": {"dir": str(root / "ckpt"), "everySteps": 10**6, "saveOnEpochEnd": False},
            "distributed": {"zeroStage": 3, "precision": "bf16"},
            "output": {"dir": str(root / "out")},
            "reporting": {"metricsPort": 0},
        }
        result, events = run_trainer(config, root, timeout=BUDGET_SECONDS - 20 - (time.monotonic() - STARTED))
    train = [e for e in events if e["event"] == "train" and e["step"] > WARMUP]
    line: dict[str, object] = {"benchmark": "gpu_check", "exit_code": result.returncode}
    if result.returncode != 0 or not train:
        line["error"] = result.stderr[-2000:]
        print(json.dumps(line))
        sys.exit(1)
    tokens_per_s = statistics.median(e["tokens_per_second"] for e in train)
    layers, heads = SHAPE["num_hidden_layers"], SHAPE["num_attention_heads"]
    head_dim = SHAPE["hidden_size"] // heads
    flops_per_token = 6 * non_embedding + 12 * layers * heads * head_dim * SEQ
    import torch

    line.update(
        {
            "gpu": "none (smoke run)" if SMOKE else torch.cuda.get_device_name(0),
            "params": total,
            "params_non_embedding": non_embedding,
            "zero_stage": 3,
            "precision": "bf16",
            "steps": STEPS,
            "micro_batch": MICRO_BATCH,
            "seq_len": SEQ,
            "tokens_per_s": round(tokens_per_s, 1),
            "step_seconds_median": round(statistics.median(e["step_seconds"] for e in train), 4),
            "flops_per_token": flops_per_token,
            "flop_convention": "6N + 12*L*H*Q*T (N without input embedding; no recompute)",
            "peak_tflops": PEAK_FLOPS / 1e12,
            "mfu": round(tokens_per_s * flops_per_token / PEAK_FLOPS, 4),
            "gpu_memory_peak_gib": round(max(e.get("gpu_memory_bytes") or 0 for e in train) / 2**30, 2),
        }
    )
    if not SMOKE:
        line.update(qlora_smoke())
    line["wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
