"""From deployment back to training: feedback posted over real HTTP to a server of a trainer-written artifact,
exported with ``python -m finetune_server export-feedback``, is the dataset of a FineTuneJob
(``examples/finetunejob-from-feedback.yaml``) whose rendered trainer config the trainer accepts and trains on.

The claims the FineTuneJob's pods would mount are folders here: ``/mnt/sources/<claim>`` (its ``pvc://``
sources) and ``/workspace`` (its checkpoint claim) are the only paths of the rendered config replaced, and the
metrics port is turned off (the pod's port would collide with other tests). The example's GPU shape and its
hyperparameters are swapped for a CPU-sized run (two steps); everything else is the example as written.
"""

from __future__ import annotations

import json
import shutil
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from hack.devcluster.processes import free_port

from finetune_server.__main__ import main as server_main
from trainer_fixtures import REPO, run_trainer, write_config

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "finetunejob-from-feedback.yaml"
SOURCES, WORKSPACE = "/mnt/sources", "/workspace"  # the pod's mount points (builders/trainer_config.py)
#: 26 questions: enough rows for the example's 10 % validation and test splits.
WORDS = [f"{a}{b}o" for a, b in zip(string.ascii_lowercase, reversed(string.ascii_lowercase), strict=True)]


@contextmanager
def serving(model_dir: Path, feedback_dir: Path) -> Iterator[str]:
    """The server of ``model_dir`` in this process (uvicorn on loopback, a thread); yields its /v1 URL."""
    import uvicorn

    from finetune_server.app import create_app
    from finetune_server.config import parse_config
    from finetune_server.models import TextGenerationModel

    config = parse_config(
        {
            "modelDir": str(model_dir),
            "modelName": "support-bot",
            "auth": {"mode": "none"},
            "feedback": {"enabled": True, "dir": str(feedback_dir)},
        }
    )
    model = TextGenerationModel(config)
    model.load()
    assert model.ready, model.health()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, model), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the server thread ended before it started"
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _localized(value: Any, mounts: dict[str, Path]) -> Any:
    """``value`` with each pod mount point replaced by the folder standing for it here."""
    if isinstance(value, dict):
        return {k: _localized(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_localized(v, mounts) for v in value]
    if isinstance(value, str):
        for mount, folder in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(folder) + value[len(mount) :]
    return value


def test_feedback_export_is_a_finetunejob_dataset_that_trains(
    trained_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune_operator.api import parse_finetunejob
    from finetune_operator.builders.trainer_config import render_trainer_config
    from finetune_trainer.config import parse_config

    manifest = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    claims = tmp_path / "claims"
    # The served model lies where the example's model source points (the earlier job's artifact).
    model_claim, _, model_path = spec["model"]["source"].removeprefix("pvc://").partition("/")
    served_model = claims / model_claim / model_path
    shutil.copytree(trained_artifact, served_model)
    feedback_claim, _, export_path = spec["dataset"]["source"].removeprefix("pvc://").partition("/")
    feedback_dir = claims / feedback_claim  # the ModelDeployment's feedback volume

    # 1. Users talk to the deployment and rate its answers (real HTTP).
    with serving(served_model, feedback_dir) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        answers = [
            client.chat.completions.create(
                model="support-bot", messages=[{"role": "user", "content": f"word: {word}"}], max_tokens=4
            )
            for word in WORDS
        ]
        ratings = [
            {"request_id": a.id, "rating": "down", "correction": f" {w[0].upper()}"}
            for a, w in zip(answers, WORDS, strict=True)
        ]
        ratings[0] = {"request_id": answers[0].id, "rating": "down"}  # no correction: not training data
        for rating in ratings:
            answer = httpx.post(f"{base}/feedback", json=rating, timeout=30)
            assert answer.status_code == 201, answer.text

    # 2. The export, written onto the feedback volume where the FineTuneJob reads it.
    export = feedback_dir / export_path
    capsys.readouterr()  # what the server logged
    assert server_main(["export-feedback", "--dir", str(feedback_dir), "--out", str(export)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == len(WORDS) - 1
    assert summary["skipped"] == {"ratedDownWithoutCorrection": 1}
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert {"prompt": "word: dwo", "completion": " D"} in rows
    assert all(set(row) == {"prompt", "completion"} for row in rows)

    # 3. The FineTuneJob that points at it: accepted by the API's model, rendered, accepted by the trainer.
    spec["hyperparameters"] = {**spec["hyperparameters"], "maxSteps": 2, "batchSize": 2, "maxSeqLength": 64}
    spec["distributed"] = {"gpusPerNode": 0, "precision": "fp32"}
    job = parse_finetunejob({**manifest, "metadata": {**manifest["metadata"], "namespace": "ml"}})
    rendered = render_trainer_config(job, shutdown_timeout_seconds=60)
    assert rendered["data"]["source"] == f"{SOURCES}/{feedback_claim}/{export_path}"
    assert rendered["data"]["fields"] == {"kind": "prompt-completion"}
    workspace = tmp_path / "workspace"
    local = _localized(rendered, {f"{SOURCES}/{c}": claims / c for c in (model_claim, feedback_claim)})
    local = _localized(local, {WORKSPACE: workspace})
    local["reporting"] = {**local["reporting"], "metricsPort": 0}
    parse_config(local)  # the trainer's own model, as the operator validates the ConfigMap

    # 4. The trainer trains on the export.
    result = run_trainer(write_config(tmp_path, local))
    assert result.returncode == 0, result.stderr[-4000:]
    out = Path(local["output"]["dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == metrics["totalSteps"] == 2
    assert set(metrics["after"]) == {"validation", "test"}  # held-out rows of the export, evaluated
    # ... and its artifact is one the server loads again (manifest verified, template carried on).
    from finetune_server.artifact import read_artifact

    artifact = read_artifact(out / "model", task="causal-lm", verify=True)
    assert artifact.template == "plain"
