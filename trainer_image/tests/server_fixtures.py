"""Artifacts and running servers for the inference-server tests: made on the spot, nothing downloaded.

``trained_artifact`` (session scope, registered in conftest.py) is what ``python -m finetune_trainer`` wrote
for a tiny Llama-style model fine-tuned on the generated word task: the server tests serve exactly that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hack.devcluster.processes import free_port

from trainer_fixtures import (
    make_config,
    make_task_data,
    make_tiny_model,
    run_trainer,
    trainer_env,
    write_config,
)


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model/ folder of a real (tiny, CPU) trainer run: weights, tokenizer, serving files, manifest."""
    root = tmp_path_factory.mktemp("trained")
    base = make_tiny_model(root / "base")
    data = make_task_data(root / "data.jsonl", rows=200)
    config = make_config(root, base, data, evaluation={"everySteps": 0, "batchSize": 16})
    result = run_trainer(write_config(root, config))
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "out" / "model"


def write_server_config(directory: Path, model_dir: Path, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "modelDir": str(model_dir),
        "modelName": "tiny",
        "host": "127.0.0.1",
        "port": free_port(),
        "auth": {"mode": "none"},
    }
    config.update(overrides)
    path = directory / "server.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@contextmanager
def running_server(
    config_path: Path,
    timeout: float = 240,
    *,
    launcher: Sequence[str] = ("-m", "finetune_server"),
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """``python -m finetune_server --config PATH`` as a pod runs it; yields its base URL once it is ready.

    `launcher` replaces ``-m finetune_server`` (a script that wraps the server); `env` replaces the
    environment (default: `trainer_env()`)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = f"http://127.0.0.1:{config['port']}"
    log = config_path.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "--config", str(config_path)],
            env=trainer_env() if env is None else dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                answer = httpx.get(f"{base}/readyz", timeout=5)
                if answer.status_code == 200:
                    break
                body = answer.json()
                assert body.get("phase") != "Failed", body
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became ready:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
