"""Serving: fp32 vs int8-dynamic vs onnx-int8, the server against the bare model, batching against none.

Everything is measured in this one process, side by side, on the same inputs:

- a Llama-style causal LM of ~125 M parameters, random-initialised from a ``LlamaConfig`` (no download),
  and a small Llama-style sequence classifier, each saved with the files a trainer artifact carries;
- each variant is loaded by the server's own loader (``finetune_server.models``), so compression, the
  quality gate (perplexity / accuracy on the shipped held-out sample) and the sizes are the server's;
- generation tokens/s and p50/p99 latency at concurrency 1 and 8 through the server's batcher;
- server overhead: the same batch-1 requests over real HTTP (uvicorn on loopback, the official openai
  client) against calling the decode loop directly (``generate_directly``), interleaved;
- batching: 8 concurrent requests with ``maxBatchSize`` 8 against ``maxBatchSize`` 1;
- the torch.ao vs torchao int8 choice, re-measured (forward of one 64-token sequence).

Random weights make the perplexity near the vocabulary size, so ``int8_ppl_change`` measures how far int8
moves the model's predictions, not what it does to a trained model's quality.

Prints one JSON line. Keys: int8_speedup (tokens/s int8 / fp32 at concurrency 1), int8_speedup_c8,
int8_size_ratio, int8_ppl_change (relative), onnx_int8_speedup (concurrency 1), onnx_int8_speedup_c8,
onnx_int8_size_ratio, onnx_int8_ppl_change, server_overhead (relative, batch 1), batching_speedup
(concurrency 8), p50_ms / p99_ms (int8 over HTTP, concurrency 8), per-variant figures, classifier figures,
int8_torchao_speedup / int8_torch_ao_speedup (forward, vs fp32), load_average_1m before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "trainer_image" / "src"), str(REPO / "trainer_image" / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from finetune_server.batching import Batcher  # noqa: E402
from finetune_server.config import parse_config  # noqa: E402
from finetune_server.models import ClassifierModel, TextGenerationModel  # noqa: E402
from finetune_server.models.text_generation import GenerationParams, generate_directly  # noqa: E402
from finetune_trainer.serving_files import QUALITY_SAMPLE_FILE, SERVING_FILE, write_manifest  # noqa: E402

VOCAB = 32000
NEW_TOKENS = 16
PROMPT_TOKENS = 24
REQUESTS_C1 = 4
CONCURRENCY = 8
QUALITY_ROWS = 16
QUALITY_TOKENS = 64
#: The issue's targets on 2 cores (printed beside the figures, never asserted).
TARGETS = {
    "int8_speedup": ">= 1.8",
    "int8_size_ratio": "<= 0.45",
    "int8_ppl_change": "<= 0.02",
    "server_overhead": "<= 0.10",
    "batching_speedup": ">= 2.5",
}


def _write_artifact(
    directory: Path, model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], serving: dict[str, Any]
) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with (directory / QUALITY_SAMPLE_FILE).open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    serving = {"version": 1, **serving, "qualitySample": {"file": QUALITY_SAMPLE_FILE, "rows": len(rows)}}
    (directory / SERVING_FILE).write_text(json.dumps(serving))
    write_manifest(directory)
    return directory


def _tokenizer() -> Any:
    from tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer()


#: The full LLM (~125 M parameters) and the ``--quick`` one (~18 M: only checks that it runs).
LLM_SHAPES = {
    "full": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "quick": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def build_llm(directory: Path, shape: str) -> tuple[Path, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        **LLM_SHAPES[shape],
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(QUALITY_ROWS):
        ids = torch.randint(0, len(tokenizer), (QUALITY_TOKENS,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    serving = {"task": "causal-lm", "template": "plain", "rowKind": "prompt-completion"}
    return _write_artifact(directory, model, tokenizer, rows, serving), params


def build_classifier(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=4,
    )
    model = LlamaForSequenceClassification(config)
    generator = torch.Generator().manual_seed(2)
    rows = [
        {
            "input_ids": torch.randint(3, len(tokenizer), (48,), generator=generator).tolist(),
            "labels": [i % 4],
        }
        for i in range(32)
    ]
    serving = {
        "task": "sequence-classification",
        "rowKind": "classification",
        "labelNames": ["a", "b", "c", "d"],
    }
    return _write_artifact(directory, model, tokenizer, rows, serving)


def _config(model_dir: Path, method: str, name: str = "bench", **extra: Any) -> Any:
    return parse_config(
        {
            "modelDir": str(model_dir),
            "modelName": name,
            "auth": {"mode": "none"},
            "quantization": {"method": method, "maxQualityDrop": 1.0},
            "limits": {"maxNewTokens": NEW_TOKENS, "maxQueuedRequests": 64, "requestTimeoutSeconds": 600},
            **extra,
        }
    )


def _load(kind: type[Any], model_dir: Path, method: str, **extra: Any) -> Any:
    model = kind(_config(model_dir, method, **extra))
    model.load()
    assert model.ready, model.health()
    return model


def _prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (PROMPT_TOKENS,), generator=generator).tolist() for _ in range(count)]


def _params() -> GenerationParams:
    return GenerationParams(max_new_tokens=NEW_TOKENS)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _through_batcher(
    model: TextGenerationModel, prompts: list[list[int]], concurrency: int, max_batch: int
) -> tuple[float, list[float]]:
    """``prompts`` sent ``concurrency`` at a time: tokens/s over the wall time, each request's latency."""
    from finetune_server.models.text_generation import GenerationRequest

    batcher = Batcher(
        model.run_batch, max_batch_size=max_batch, max_wait_s=0.01, max_queued=64, timeout_s=600
    )
    latencies: list[float] = []
    tokens = 0

    async def one(ids: list[int]) -> None:
        nonlocal tokens
        started = time.perf_counter()
        generation = await batcher.submit(GenerationRequest(ids, _params()))
        latencies.append(time.perf_counter() - started)
        tokens += generation.completion_tokens

    started = time.perf_counter()
    for start in range(0, len(prompts), concurrency):
        await asyncio.gather(*(one(ids) for ids in prompts[start : start + concurrency]))
    wall = time.perf_counter() - started
    batcher.close()
    return tokens / wall, latencies


def in_rounds(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Each run once per round, the order rotated from round to round: load from other processes (this
    machine is shared) then falls on every variant alike, and each ratio is taken within one round."""
    names = list(runs)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(runs[name]())
    return out


def _ratios(values: dict[str, list[float]], name: str, baseline: str) -> dict[str, float]:
    """Median, min and max over the rounds of ``name`` / ``baseline`` (same round)."""
    ratios = [v / b for v, b in zip(values[name], values[baseline], strict=True)]
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _latency_summary(runs: list[tuple[float, list[float]]]) -> dict[str, float]:
    latencies = [latency for _, per_run in runs for latency in per_run]
    return {
        "tokens_per_s": round(statistics.median(tps for tps, _ in runs), 2),
        "p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "requests": len(latencies),
    }


def _never_stop(model: TextGenerationModel) -> None:
    model.eos_ids = set()  # random weights: every request generates exactly NEW_TOKENS


LLM_METHODS = ("none", "int8-dynamic", "onnx-int8")


def measure_llm(model_dir: Path, rounds: int) -> tuple[dict[str, Any], TextGenerationModel]:
    """fp32, int8 and onnx-int8 loaded side by side, then measured in rotating rounds."""
    results: dict[str, Any] = {}
    models: dict[str, TextGenerationModel] = {}
    for method in LLM_METHODS:
        model = _load(TextGenerationModel, model_dir, method)
        _never_stop(model)
        health = model.health()
        entry: dict[str, Any] = {"size_bytes": health["sizeBytes"], "load_s": health["loadSeconds"]}
        if health["quality"]:
            (gate,) = health["quality"]
            entry["ppl"], entry["ppl_baseline"], entry["ppl_change"] = (
                gate["value"],
                gate["baseline"],
                gate["qualityDrop"],
            )
        generate_directly(model, _request(_prompts(1, 99)[0]))  # warm-up
        results[method], models[method] = entry, model
        print(f"# loaded {method}: {entry}", file=sys.stderr, flush=True)
    c1_prompts, c8_prompts = _prompts(REQUESTS_C1, 1), _prompts(CONCURRENCY, 2)
    for level, prompts, concurrency in (("c1", c1_prompts, 1), ("c8", c8_prompts, CONCURRENCY)):
        runs = in_rounds(
            {
                method: lambda m=model, p=prompts, c=concurrency: asyncio.run(_through_batcher(m, p, c, c))
                for method, model in models.items()
            },
            rounds,
        )
        speeds = {method: [tps for tps, _ in per_round] for method, per_round in runs.items()}
        for method in LLM_METHODS:
            results[method][level] = _latency_summary(runs[method])
            if method != "none":
                results[method][f"{level}_speedup"] = _ratios(speeds, method, "none")
        print(f"# {level}: { {m: results[m][level] for m in LLM_METHODS} }", file=sys.stderr, flush=True)
    return results, models["int8-dynamic"]


def _request(ids: list[int]) -> Any:
    from finetune_server.models.text_generation import GenerationRequest

    return GenerationRequest(ids, _params())


def measure_batching(model: TextGenerationModel, rounds: int) -> dict[str, Any]:
    """The same 8 concurrent requests through the batcher with maxBatchSize 8 and with maxBatchSize 1."""
    prompts = _prompts(CONCURRENCY, 3)
    runs = in_rounds(
        {
            "batched": lambda: asyncio.run(_through_batcher(model, prompts, CONCURRENCY, CONCURRENCY))[0],
            "one_at_a_time": lambda: asyncio.run(_through_batcher(model, prompts, CONCURRENCY, 1))[0],
        },
        rounds,
    )
    speedup = _ratios(runs, "batched", "one_at_a_time")
    return {
        "one_at_a_time_tokens_per_s": round(statistics.median(runs["one_at_a_time"]), 2),
        "batched_tokens_per_s": round(statistics.median(runs["batched"]), 2),
        "batching_speedup": speedup["median"],
        "batching_speedup_min": speedup["min"],
        "batching_speedup_max": speedup["max"],
    }


def measure_server(model: TextGenerationModel, pairs: int) -> dict[str, float]:
    """Real HTTP: uvicorn on loopback serving the loaded model; the official openai client."""
    import openai
    import uvicorn
    from hack.devcluster.processes import free_port

    from finetune_server.app import create_app

    port = free_port()
    app = create_app(
        model.config.model_copy(
            update={"batching": model.config.batching.model_copy(update={"max_wait_ms": 0.0})}
        ),
        model,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    tokenizer = model.tokenizer
    prompts = [tokenizer.decode(ids) for ids in _prompts(pairs, 4)]
    client.completions.create(model="bench", prompt=prompts[0], max_tokens=NEW_TOKENS)  # warm-up
    direct, served = [], []

    def call_directly(text: str) -> float:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        started = time.perf_counter()
        generation = generate_directly(model, _request(ids))
        assert generation.completion_tokens == NEW_TOKENS
        return time.perf_counter() - started

    def call_server(text: str) -> float:
        started = time.perf_counter()
        answer = client.completions.create(model="bench", prompt=text, max_tokens=NEW_TOKENS)
        elapsed = time.perf_counter() - started
        assert answer.usage is not None
        assert answer.usage.completion_tokens == NEW_TOKENS
        return elapsed

    # Interleaved pairs, which of the two goes first alternating: load from other processes hits both alike.
    for number, text in enumerate(prompts):
        if number % 2:
            served.append(call_server(text))
            direct.append(call_directly(text))
        else:
            direct.append(call_directly(text))
            served.append(call_server(text))

    # concurrency 8 over HTTP: the headline latency figures
    async def burst() -> list[float]:
        async_client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
        )

        async def one(text: str) -> float:
            started = time.perf_counter()
            await async_client.completions.create(model="bench", prompt=text, max_tokens=NEW_TOKENS)
            return time.perf_counter() - started

        texts = [tokenizer.decode(ids) for ids in _prompts(CONCURRENCY * 2, 5)]
        out: list[float] = []
        for start in range(0, len(texts), CONCURRENCY):
            out += await asyncio.gather(*(one(t) for t in texts[start : start + CONCURRENCY]))
        return out

    latencies = asyncio.run(burst())
    server.should_exit = True
    thread.join(timeout=30)
    ratios = [s / d for s, d in zip(served, direct, strict=True)]
    return {
        "direct_ms_median": round(statistics.median(direct) * 1000, 1),
        "server_ms_median": round(statistics.median(served) * 1000, 1),
        "server_overhead": round(statistics.median(ratios) - 1, 4),
        "server_overhead_min": round(min(ratios) - 1, 4),
        "server_overhead_max": round(max(ratios) - 1, 4),
        "pairs": pairs,
        "http_c8_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "http_c8_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
    }


def measure_classifier(model_dir: Path, rounds: int) -> dict[str, Any]:
    """Inputs/s of the classifier's forward at batch 1 and 8, the three variants in rotating rounds."""
    out: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(6)
    batch = torch.randint(3, 90, (CONCURRENCY, 48), generator=generator)
    mask = torch.ones_like(batch)
    models: dict[str, Any] = {}
    for method in LLM_METHODS:
        model = _load(ClassifierModel, model_dir, method)
        health = model.health()
        out[method] = {"size_bytes": health["sizeBytes"]}
        if health["quality"]:
            out[method]["accuracy_change"] = health["quality"][0]["qualityDrop"]
        models[method] = model

    def inputs_per_s(model: Any, size: int) -> float:
        with torch.inference_mode():
            model.backend.logits(batch[:size], mask[:size])
            started, runs = time.perf_counter(), 0
            while time.perf_counter() - started < 1.0:
                model.backend.logits(batch[:size], mask[:size])
                runs += 1
            return runs * size / (time.perf_counter() - started)

    for size in (1, CONCURRENCY):
        speeds = in_rounds(
            {method: lambda m=model, s=size: inputs_per_s(m, s) for method, model in models.items()}, rounds
        )
        for method in LLM_METHODS:
            out[method][f"c{size}_inputs_per_s"] = round(statistics.median(speeds[method]), 2)
            if method != "none":
                out[method][f"c{size}_speedup"] = _ratios(speeds, method, "none")
    base = out["none"]
    for method in ("int8-dynamic", "onnx-int8"):
        out[f"{method}_speedup_c8"] = out[method]["c8_speedup"]["median"]
        out[f"{method}_size_ratio"] = round(out[method]["size_bytes"] / base["size_bytes"], 3)
    return out


def measure_int8_backends(model_dir: Path) -> dict[str, float]:
    """The choice behind int8-dynamic: torch.ao against torchao on this CPU (one 64-token forward)."""
    import copy
    import warnings

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_ao = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8
        )
    torchao_model = copy.deepcopy(fp32)
    quantize_(torchao_model, Int8DynamicActivationInt8WeightConfig())
    ids = torch.randint(3, 90, (1, 64), generator=torch.Generator().manual_seed(7))
    timings: dict[str, list[float]] = {"fp32": [], "torch_ao": [], "torchao": []}
    with torch.inference_mode():
        for _ in range(3):  # interleaved rounds
            for name, model in (("fp32", fp32), ("torch_ao", torch_ao), ("torchao", torchao_model)):
                started = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                timings[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in timings.items()}
    return {
        "int8_torch_ao_speedup": round(best["fp32"] / best["torch_ao"], 3),
        "int8_torchao_speedup": round(best["fp32"] / best["torchao"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~18 M LLM: only checks that the script runs",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rotating rounds of each comparison")
    parser.add_argument("--pairs", type=int, default=12, help="direct/served request pairs (server overhead)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        llm_dir, params = build_llm(Path(tmp) / "llm", "quick" if args.quick else "full")
        llm, int8_model = measure_llm(llm_dir, args.rounds)
        batching = measure_batching(int8_model, args.rounds)
        print(f"# batching: {batching}", file=sys.stderr, flush=True)
        server = measure_server(int8_model, args.pairs)
        print(f"# server: {server}", file=sys.stderr, flush=True)
        classifier = measure_classifier(build_classifier(Path(tmp) / "classifier"), args.rounds)
        backends = measure_int8_backends(llm_dir)
    fp32, int8, onnx = llm["none"], llm["int8-dynamic"], llm["onnx-int8"]

    def speed(variant: dict[str, Any], key: str) -> float:
        median: float = variant[f"{key}_speedup"]["median"]
        return median

    line = {
        "benchmark": "serving",
        "llm_parameters": params,
        "quick": args.quick,
        "int8_speedup": speed(int8, "c1"),
        "int8_speedup_c8": speed(int8, "c8"),
        "int8_size_ratio": round(int8["size_bytes"] / fp32["size_bytes"], 3),
        "int8_ppl_change": round(int8["ppl_change"], 5),
        "onnx_int8_speedup": speed(onnx, "c1"),
        "onnx_int8_speedup_c8": speed(onnx, "c8"),
        "onnx_int8_size_ratio": round(onnx["size_bytes"] / fp32["size_bytes"], 3),
        "onnx_int8_ppl_change": round(onnx["ppl_change"], 5),
        "server_overhead": server["server_overhead"],
        "batching_speedup": batching["batching_speedup"],
        "p50_ms": server["http_c8_p50_ms"],
        "p99_ms": server["http_c8_p99_ms"],
        **backends,
        "llm": llm,
        "batching": batching,
        "server": server,
        "classifier": classifier,
        "targets": TARGETS,
        "rounds": args.rounds,
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": PROMPT_TOKENS,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
