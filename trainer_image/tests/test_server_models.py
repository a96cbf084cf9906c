"""Served models in-process on real (tiny) weights: compression registry, quality gate, manifest, adapters,
batching and deadlines. The HTTP surface is in test_server.py and test_server_classifier.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_server.batching import Batcher
from finetune_server.config import parse_config
from finetune_server.errors import RequestTimeoutError
from finetune_server.models import ClassifierModel, TextGenerationModel
from finetune_server.models.text_generation import Generation, GenerationParams
from finetune_server.pruning import two_four_mask
from finetune_trainer.serving_files import write_manifest
from trainer_fixtures import make_tiny_model


def _load(model_dir: Path, **config: Any) -> TextGenerationModel:
    model = TextGenerationModel(parse_config({"modelDir": str(model_dir), "modelName": "tiny", **config}))
    model.load()
    return model


def test_the_gate_blocks_95_percent_pruning_and_says_by_how_much(trained_artifact: Path) -> None:
    model = _load(trained_artifact, pruning={"method": "magnitude", "sparsity": 0.95, "maxQualityDrop": 0.05})
    assert not model.ready
    health = model.health()
    assert health["reason"] == "QualityGateFailed"
    (result,) = health["quality"]
    assert result["step"] == "pruning"
    assert not result["passed"]
    assert result["qualityDrop"] > 0.05
    assert result["sparsity"] >= 0.94
    assert "above pruning.maxQualityDrop" in health["message"]


def test_int8_and_2_4_pass_with_measured_figures(trained_artifact: Path) -> None:
    model = _load(
        trained_artifact,
        pruning={"method": "2:4", "maxQualityDrop": 1.0},
        quantization={"method": "int8-dynamic", "maxQualityDrop": 0.05},
    )
    assert model.ready, model.health()
    pruning, quantization = model.health()["quality"]
    assert pruning["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert quantization["baseline"] == pruning["value"]  # each step against the model it started from
    assert quantization["passed"]
    assert quantization["sizeBytes"] < quantization["originalSizeBytes"] / 2


def test_onnx_int8_serves_generation_through_onnx_runtime(trained_artifact: Path) -> None:
    model = _load(trained_artifact, quantization={"method": "onnx-int8", "maxQualityDrop": 0.05})
    assert model.ready, model.health()
    assert type(model.backend).__name__ == "OnnxBackend"
    (gate,) = model.health()["quality"]
    assert gate["passed"]
    reference = _load(trained_artifact)
    prompt = "word: kite\nfirst:\n"
    assert _generate(model, prompt, 6).text == _generate(reference, prompt, 6).text


def test_a_method_on_the_wrong_device_is_refused_before_loading(trained_artifact: Path) -> None:
    model = _load(trained_artifact, quantization={"method": "bnb-nf4"})
    health = model.health()
    assert health["phase"] == "Failed"
    assert health["reason"] == "InvalidConfig"
    assert health["message"].startswith("quantization.method: bnb-nf4 needs cuda")
    assert "int8-dynamic" in health["message"]
    assert model.backend is None
    assert model.tokenizer is None
    assert health["loadSeconds"] < 5


def test_a_changed_file_fails_the_manifest_check(trained_artifact: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(trained_artifact, tmp_path / "model"))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    model = _load(copy)
    assert model.health()["reason"] == "ArtifactInvalid"
    assert "config.json" in model.health()["message"]
    (copy / "extra.bin").write_bytes(b"x")
    write_manifest(copy)
    assert _load(copy).ready


def test_gpt2_conv1d_layers_are_quantised_too(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer_fixtures import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    plain = _load(tmp_path / "gpt2", verifyManifest=False, task="causal-lm", qualityGate={"enabled": False})
    model = _load(
        tmp_path / "gpt2",
        verifyManifest=False,
        task="causal-lm",
        qualityGate={"enabled": False},
        quantization={"method": "int8-dynamic"},
    )
    quantized = [
        m
        for m in model.backend.module.modules()
        if type(m).__name__ == "Linear" and "quantized" in type(m).__module__
    ]
    assert len(quantized) >= 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj per block
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        close = torch.allclose(model.backend.logits(ids, mask), plain.backend.logits(ids, mask), atol=0.1)
    assert close


def test_a_lora_adapter_is_merged_at_load(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = make_tiny_model(tmp_path / "base")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    from trainer_fixtures import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    model = _load(tmp_path / "adapter", verifyManifest=False, task="causal-lm", baseModelDir=str(base_dir))
    assert model.ready, model.health()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        expected = peft_model.eval()(input_ids=ids).logits
        served = model.backend.logits(ids, torch.ones_like(ids))
    assert torch.allclose(served, expected, atol=1e-4)


def _generate(model: TextGenerationModel, prompt: str, tokens: int) -> Generation:
    async def once() -> Generation:
        batcher = Batcher(model.run_batch, max_batch_size=1, max_wait_s=0, max_queued=4, timeout_s=60)
        try:
            result: Generation = await batcher.submit(model.encode(prompt, GenerationParams(tokens), 1000))
            return result
        finally:
            batcher.close()

    return asyncio.run(once())


def test_concurrent_requests_share_batches_and_answer_as_alone(trained_artifact: Path) -> None:
    model = _load(trained_artifact)
    prompts = [f"word: {w}\nfirst:\n" for w in ("cat", "horse", "ox", "zebra", "dog", "emu")]
    alone = [_generate(model, p, 5).text for p in prompts]

    async def together() -> tuple[list[str], int]:
        batcher = Batcher(model.run_batch, max_batch_size=8, max_wait_s=0.2, max_queued=16, timeout_s=60)
        try:
            results = await asyncio.gather(
                *(batcher.submit(model.encode(p, GenerationParams(5), 1000)) for p in prompts)
            )
            return [r.text for r in results], batcher.stats.batches
        finally:
            batcher.close()

    texts, batches = asyncio.run(together())
    assert texts == alone
    assert batches < len(prompts)


def test_a_request_past_its_deadline_is_cancelled_not_left_running(tmp_path: Path) -> None:
    untrained = make_tiny_model(tmp_path / "m")  # random weights: it rarely ends a sequence by itself
    model = _load(untrained, verifyManifest=False, task="causal-lm")
    model.eos_ids = set()  # generate the whole budget unless cancelled

    async def late() -> Generation:
        batcher = Batcher(model.run_batch, max_batch_size=1, max_wait_s=0, max_queued=4, timeout_s=0.05)
        try:
            work = batcher.admit(model.encode("ab", GenerationParams(120), 1000))
            with pytest.raises(RequestTimeoutError, match="requestTimeoutSeconds"):
                await batcher.wait(work)
            result: Generation = await work.future  # the batch still answers its own future, cut short
            return result
        finally:
            batcher.close()

    generation = asyncio.run(late())
    assert generation.finish_reason == "cancelled"
    assert generation.completion_tokens < 120


def test_two_four_mask_keeps_the_two_largest_of_every_four() -> None:
    weight = torch.tensor([[0.1, -4.0, 3.0, 0.2, 5.0, 6.0, -7.0, 8.0]])
    assert two_four_mask(weight).tolist() == [[0, 1, 1, 0, 0, 0, 1, 1]]


def test_classifier_kind_is_registered_for_its_task() -> None:
    from finetune_server.models import MODEL_KINDS

    assert MODEL_KINDS["causal-lm"] is TextGenerationModel
    assert MODEL_KINDS["sequence-classification"] is ClassifierModel
    assert all(kind.task == task for task, kind in MODEL_KINDS.items())
