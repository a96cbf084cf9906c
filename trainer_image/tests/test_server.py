"""The inference server over real HTTP, driven by the official `openai` client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from trainer_fixtures import make_tiny_model, trainer_env

API_KEY = "sk-test-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("server")
    model_dir = make_tiny_model(root / "model")
    (root / "keys").mkdir()
    (root / "keys" / "key").write_text(f"{API_KEY}\n")
    port = _free_port()
    config = {
        "modelDir": str(model_dir),
        "modelName": "tiny",
        "host": "127.0.0.1",
        "port": port,
        "verifyManifest": False,
        "auth": {"apiKeysDir": str(root / "keys")},
        "limits": {"maxNewTokens": 32},
    }
    (root / "server.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_server", "--config", str(root / "server.json")],
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_completions_and_chat_through_the_official_client(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list()] == ["tiny"]

    completion = client.completions.create(model="tiny", prompt="word: abc\nfirst:", max_tokens=5, seed=1)
    choice = completion.choices[0]
    assert isinstance(choice.text, str)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len("word: abc\nfirst:")  # one token per character
    assert 1 <= completion.usage.completion_tokens <= 5
    assert choice.finish_reason in {"stop", "length"}

    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.7, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None
    assert chat.usage.completion_tokens <= 4


def test_wrong_or_missing_key_is_refused_with_401(server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong").completions.create(
            model="tiny", prompt="x", max_tokens=1
        )
    assert httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    # Probes and metrics need no key.
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_bad_requests_name_the_field(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=5)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="x", max_tokens=1)


def test_metrics_count_requests_and_tokens(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    client.completions.create(model="tiny", prompt="abc", max_tokens=3)
    text = httpx.get(f"{server}/metrics").text
    assert 'fto_server_requests_total{code="200",route="/v1/completions"}' in text
    assert "fto_server_model_ready 1.0" in text
    tokens = [line for line in text.splitlines() if line.startswith("fto_server_completion_tokens_total ")]
    assert tokens
    assert float(tokens[0].split()[1]) >= 1


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
