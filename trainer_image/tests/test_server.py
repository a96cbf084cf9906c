"""The inference server over real HTTP on an artifact the trainer wrote, driven by the official openai client.

One server process (int8-dynamic behind the quality gate, API keys from a folder, feedback on, a small queue)
serves the whole module; the tests run in order against it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_fixtures import running_server, write_server_config
from trainer_fixtures import trainer_env

API_KEY = "sk-test-0123456789"
PROMPT = "word: abc\nfirst:"


@pytest.fixture(scope="module")
def served(trained_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("server")
    keys = root / "keys"
    keys.mkdir()
    (keys / "api-key").write_text(f"{API_KEY}\n")
    config = write_server_config(
        root,
        trained_artifact,
        quantization={"method": "int8-dynamic", "maxQualityDrop": 0.05},
        auth={"apiKeysDir": str(keys), "reloadSeconds": 0},
        feedback={"enabled": True, "dir": str(root / "feedback")},
        limits={"maxNewTokens": 48, "maxInputTokens": 100, "maxQueuedRequests": 3, "maxRequestBytes": 4096},
        batching={"maxBatchSize": 4, "maxWaitMs": 20},
    )
    with running_server(config) as base:
        yield base, root


def _client(served: tuple[str, Path], key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=key, max_retries=0)


def test_ready_answer_carries_the_measured_gate(served: tuple[str, Path]) -> None:
    body = httpx.get(f"{served[0]}/v2/health/ready").json()
    assert body["ready"]
    assert body["device"] == "cpu"
    (gate,) = body["quality"]
    assert gate["step"] == "quantization"
    assert gate["method"] == "int8-dynamic"
    assert gate["metric"] == "perplexity"
    assert gate["passed"]
    assert gate["qualityDrop"] <= 0.05
    assert 0 < body["sizeBytes"] < body["originalSizeBytes"]


def test_completions_and_chat_through_the_official_client(served: tuple[str, Path]) -> None:
    client = _client(served)
    assert [m.id for m in client.models.list()] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt=PROMPT + "\n", max_tokens=5, seed=1)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(PROMPT) + 1  # one token per character
    assert completion.usage.completion_tokens <= 5
    assert completion.choices[0].finish_reason in {"stop", "length"}

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0.9, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None
    assert chat.usage.completion_tokens <= 4
    # The chat prompt is rendered with the job's template (plain: the prompt and "\n"): same prompt tokens.
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens


def test_streaming_sends_the_same_text_as_one_answer(served: tuple[str, Path]) -> None:
    client = _client(served)
    whole = client.completions.create(model="tiny", prompt="word: q", max_tokens=12, temperature=1.0, seed=5)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="word: q",
            max_tokens=12,
            temperature=1.0,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]

    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "word: q"}], max_tokens=6, stream=True
    )
    deltas = list(stream)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason in {"stop", "length"}


def test_no_or_wrong_key_is_refused_with_401_and_probes_stay_open(served: tuple[str, Path]) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(served, "sk-wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    answer = httpx.post(f"{served[0]}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served[0]}/v2/health/live").status_code == 200
    assert httpx.get(f"{served[0]}/metrics").status_code == 200


def test_a_rotated_key_works_without_a_restart(served: tuple[str, Path]) -> None:
    root = served[1]
    keys = root / "keys"
    (keys / "api-key").write_text("sk-rotated-1\n")  # what a Secret update does to the mounted file
    with pytest.raises(openai.AuthenticationError):
        _client(served).completions.create(model="tiny", prompt="x", max_tokens=1)
    assert _client(served, "sk-rotated-1").completions.create(model="tiny", prompt="x", max_tokens=1).choices
    (keys / "api-key").write_text(f"{API_KEY}\nsk-rotated-1\n")
    assert _client(served).completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_bad_requests_name_the_field(served: tuple[str, Path]) -> None:
    client = _client(served)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 1000 is above"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="model: 'other' is not served here"):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(
        f"{served[0]}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=headers
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["param"] == "body"
    missing = httpx.post(f"{served[0]}/v1/completions", json={"model": "tiny"}, headers=headers)
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "prompt"


def test_oversized_requests_get_413_naming_the_field(served: tuple[str, Path]) -> None:
    client = _client(served)
    with pytest.raises(openai.APIStatusError, match="prompt: 101 tokens") as caught:
        client.completions.create(model="tiny", prompt="a" * 101, max_tokens=1)
    assert caught.value.status_code == 413
    with pytest.raises(openai.APIStatusError, match="body: the request is larger") as caught:
        client.completions.create(model="tiny", prompt="a" * 5000, max_tokens=1)
    assert caught.value.status_code == 413


def test_a_full_queue_answers_429_with_retry_after(served: tuple[str, Path]) -> None:
    base = served[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "word: zz", "max_tokens": 48, "temperature": 1.0, "seed": 1}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(
                await asyncio.gather(
                    *(client.post(f"{base}/v1/completions", json=body, headers=headers) for _ in range(10))
                )
            )

    answers = asyncio.run(burst())
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 429}, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "limits.maxQueuedRequests" in refused.json()["error"]["message"]
    assert codes.count(200) >= 3  # the queue admitted up to its bound


def test_metrics_use_vllm_names(served: tuple[str, Path]) -> None:
    text = httpx.get(f"{served[0]}/metrics").text
    for name in (
        "vllm:e2e_request_latency_seconds_count",
        "vllm:time_to_first_token_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        'fto_server_requests_total{code="429",route="/v1/completions"}',
        'fto_server_requests_total{code="401",route="/v1/completions"}',
        'fto_server_quality_gate_passed{step="quantization"} 1.0',
        'fto_server_quality_drop{metric="perplexity",step="quantization"}',
        "fto_server_model_ready 1.0",
    ):
        assert name in text, name


def test_feedback_lands_and_its_export_is_training_data(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    client = _client(served)
    good = client.completions.create(model="tiny", prompt="word: up\nfirst:\n", max_tokens=3)
    fixed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "word: fix"}], max_tokens=3
    )
    bad = client.completions.create(model="tiny", prompt="word: bad", max_tokens=3)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for entry in (
        {"request_id": good.id, "rating": "up"},
        {"request_id": fixed.id, "rating": "down", "correction": " F"},
        {"request_id": bad.id, "rating": "down"},
        {"request_id": "cmpl-unknown", "rating": "up"},
    ):
        assert httpx.post(f"{base}/v1/feedback", json=entry, headers=headers).status_code == 201
    refused = httpx.post(
        f"{base}/v1/feedback", json={"request_id": good.id, "rating": "great"}, headers=headers
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "rating"
    assert httpx.post(f"{base}/v1/feedback", json={"request_id": good.id, "rating": "up"}).status_code == 401

    out = tmp_path / "feedback.jsonl"
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_server",
            "export-feedback",
            "--dir",
            str(root / "feedback"),
            "--out",
            str(out),
        ],
        env=trainer_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    summary = json.loads(exported.stdout)
    answered = bool(good.choices[0].text.strip())  # a tiny model may answer with end-of-sequence at once
    expected_skips = {"ratedDownWithoutCorrection": 1, "unknownRequest": 1}
    if not answered:
        expected_skips["emptyCompletion"] = 1
    assert summary == {"out": str(out), "rows": 1 + answered, "skipped": expected_skips}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"prompt": "word: fix", "completion": " F"} in rows
    if answered:
        assert {"prompt": "word: up\nfirst:\n", "completion": good.choices[0].text} in rows

    # The export is what a FineTuneJob's data section reads (default field mapping: prompt-completion).
    from finetune_trainer.data.config import DataConfig
    from finetune_trainer.data.pipeline import prepare
    from trainer_fixtures import tiny_tokenizer

    data = DataConfig.model_validate(
        {"source": str(out), "split": {"validation": 0.0, "test": 0.0}, "dedup": {"exact": False}}
    )
    prepared = prepare(data, tiny_tokenizer(), tmp_path / "prepared")
    assert len(prepared.train) == 1 + answered


def test_invalid_config_exits_with_the_config_error_code(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"modelDir": "/x", "modelName": "m", "prot": 1}))
    res = subprocess.run(
        [sys.executable, "-m", "finetune_server", "--config", str(tmp_path / "bad.json")],
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 3
    assert "prot" in res.stderr
    assert "did you mean 'port'" in res.stderr
