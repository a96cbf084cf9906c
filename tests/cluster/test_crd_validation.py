"""The generated CRDs on a real API server: every example is accepted with the same defaults Python applies,
every invalid example is refused with its expected message, status survives the status subresource
unpruned, and the printer columns, short names, category and `kubectl explain` work."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.common import Condition
from finetune_operator.api.finetunejob import (
    Admission,
    Artifact,
    Checkpoints,
    FineTuneJobStatus,
    Metrics,
    NodePlacement,
    Progress,
    parse_finetunejob,
)
from finetune_operator.api.modeldeployment import (
    AnalysisResult,
    ModelDeploymentStatus,
    QualityResult,
    ResolvedModel,
    Revision,
    RolloutEvent,
    RolloutStatus,
    parse_modeldeployment,
)
from tests.api_examples import EXAMPLES, InvalidExample, invalid_examples, load, valid_examples
from tests.kube_helpers import Cluster, kubectl_json, wait_for

pytestmark = pytest.mark.cluster

# Server-side dry runs persist nothing, so they can share the always-present namespace.
DRY_RUN_NAMESPACE = "default"
WHEN = datetime(2026, 11, 29, 3, 0, 0, tzinfo=UTC)


def _defaults_agree(server: Any, python: Any, path: str = "spec") -> None:
    """Every value the API server stored (given or defaulted) is the one Python's model has there."""
    if isinstance(server, dict) and isinstance(python, dict):
        for key, value in server.items():
            assert key in python, f"{path}.{key}: defaulted by the server, unknown to Python"
            _defaults_agree(value, python[key], f"{path}.{key}")
    else:
        assert server == python, f"{path}: server {server!r}, Python {python!r}"


@pytest.mark.parametrize("path", valid_examples(), ids=lambda p: p.name)
def test_example_is_accepted_with_the_defaults_python_applies(
    cluster: Cluster, crds: list[str], path: Path
) -> None:
    stored = kubectl_json(cluster, "apply", "--dry-run=server", "-n", DRY_RUN_NAMESPACE, "-f", str(path))
    body = load(path)
    parse = parse_finetunejob if body["kind"] == "FineTuneJob" else parse_modeldeployment
    _defaults_agree(stored["spec"], parse(body).spec.to_k8s())
    assert parse({**body, "spec": stored["spec"]}).spec == parse(body).spec


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.name)
def test_invalid_example_is_refused_with_its_message(
    cluster: Cluster, crds: list[str], example: InvalidExample
) -> None:
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-n", DRY_RUN_NAMESPACE, "-f", str(example.path), check=False
    )
    assert result.returncode != 0, f"accepted: {result.stdout}"
    for expected in example.expects:
        assert expected in result.stderr


def _job_status() -> FineTuneJobStatus:
    return FineTuneJobStatus(
        phase="Running",
        observed_generation=1,
        conditions=[
            Condition(
                type="Admitted",
                status="True",
                reason="GangPlaced",
                message="1 node x 8 GPUs on gpu-node-0",
                last_transition_time=WHEN,
                observed_generation=1,
            ),
            Condition(type="Running", status="True", reason="PodsRunning", last_transition_time=WHEN),
        ],
        attempt=2,
        restarts=1,
        admission=Admission(
            placement=[NodePlacement(rank=0, node="gpu-node-0", gpus=8)], admitted_at=WHEN, gpus=8
        ),
        progress=Progress(
            step=420,
            total_steps=1000,
            epoch=1.26,
            percent=42.0,
            eta_seconds=600,
            samples_per_second=31.5,
            tokens_per_second=64512.0,
            stage="Training",
            updated_at=WHEN,
        ),
        metrics=Metrics(
            train_loss=1.25,
            eval_loss=1.5,
            best_eval_loss=1.4,
            best_step=400,
            perplexity=4.48,
            learning_rate=0.0001,
            extra={"accuracy": 0.61},
            before={"loss": 2.9, "perplexity": 18.2},
        ),
        checkpoints=Checkpoints(
            latest="checkpoints/step-400", latest_step=400, best="checkpoints/step-400", count=2
        ),
        artifact=Artifact(uri="pvc://ftj-x/model", size_bytes=1234, format="adapter", sha256="ab" * 32),
        queued_since=WHEN,
        start_time=WHEN,
        last_failure="pod ftj-x-0 exited 137 (OOMKilled)",
    )


def _deployment_status() -> ModelDeploymentStatus:
    return ModelDeploymentStatus(
        observed_generation=1,
        conditions=[Condition(type="Ready", status="True", reason="Serving", last_transition_time=WHEN)],
        endpoint="http://support-bot.ns.svc/v1",
        api_key_secret="support-bot-api-keys",
        model=ResolvedModel(uri="pvc://ftj-x/model", task="causal-lm", sha256="cd" * 32, fine_tune_job="x"),
        replicas=3,
        ready_replicas=3,
        revisions=[Revision(name="5d1c2f9a0b", model_uri="pvc://ftj-x/model", created_at=WHEN)],
        rollout=RolloutStatus(
            stable_revision="5d1c2f9a0b",
            canary_revision="77aa01c3e2",
            step=0,
            weight=10,
            step_started_at=WHEN,
            analysis=AnalysisResult(
                verdict="Pass",
                requests=120,
                errors=0,
                error_rate=0.0,
                p95_latency_ms=812.5,
                stable_error_rate=0.0,
                message="120 requests, 0 errors",
                checked_at=WHEN,
            ),
            history=[
                RolloutEvent(
                    time=WHEN,
                    revision="77aa01c3e2",
                    decision="Started",
                    step=0,
                    weight=10,
                    reason="CanaryStarted",
                    message="canary 77aa01c3e2 at 10 %",
                )
            ],
        ),
        quantization=QualityResult(
            method="int8-dynamic",
            metric="perplexity",
            baseline=4.48,
            value=4.52,
            quality_drop=0.009,
            max_quality_drop=0.02,
            size_bytes=130_000_000,
            original_size_bytes=500_000_000,
            passed=True,
        ),
    )


def test_status_round_trips_through_the_status_subresource(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    for example, status, parse, kind in (
        ("finetunejob-causal-lm-lora.yaml", _job_status(), parse_finetunejob, "finetunejob"),
        ("modeldeployment-canary.yaml", _deployment_status(), parse_modeldeployment, "modeldeployment"),
    ):
        body = load(EXAMPLES / example)
        cluster.kubectl("create", "-n", namespace, "-f", str(EXAMPLES / example))
        name = body["metadata"]["name"]
        patch = json.dumps({"status": status.to_k8s()})
        cluster.kubectl(
            "patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch
        )
        stored = kubectl_json(cluster, "get", kind, name, "-n", namespace)
        assert stored["status"] == status.to_k8s(), "the API server pruned or changed status fields"
        assert parse(stored).status == status


def test_printer_columns_short_names_and_category(cluster: Cluster, crds: list[str], namespace: str) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", str(EXAMPLES / "finetunejob-causal-lm-lora.yaml"))
    cluster.kubectl("create", "-n", namespace, "-f", str(EXAMPLES / "modeldeployment-rolling.yaml"))
    status = _job_status()
    cluster.kubectl(
        "patch", "ftj", "support-bot-lora", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status.to_k8s()}),
    )  # fmt: skip
    header, row = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "ATTEMPT", "RESTARTS", "AGE"]
    assert row.split()[:6] == [
        "support-bot-lora", "Running", "42", "1.25", str(status.attempt), str(status.restarts),
    ]  # fmt: skip
    wide_header = cluster.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert wide_header.split()[1:3] == ["TASK", "METHOD"]
    header = cluster.kubectl("get", "mdep", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == ["NAME", "READY", "REASON", "REPLICAS", "CANARY", "AGE"]
    wide = cluster.kubectl("get", "mdep", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert {"QUANTIZATION", "QUALITY-DROP", "REVISION", "ENDPOINT"} <= set(wide.split())
    listed = cluster.kubectl("get", "finetune", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == [
        "finetunejob.finetune.dev/support-bot-lora",
        "modeldeployment.finetune.dev/support-bot",
    ]


def test_kubectl_explain_teaches_every_level(cluster: Cluster, crds: list[str]) -> None:
    def explain(path: str) -> str | None:
        result = cluster.kubectl("explain", path, check=False)
        return result.stdout if result.returncode == 0 else None

    # The published OpenAPI document follows a CRD change after a moment.
    text = wait_for(lambda: explain("ftj.spec.distributed.gpusPerNode"), 60, "kubectl explain ftj")
    assert "GPUs per pod" in text
    mdep = wait_for(lambda: explain("mdep.spec.quantization.maxQualityDrop"), 60, "kubectl explain mdep")
    assert "QualityGateFailed" in mdep


def test_what_the_job_trains_is_immutable_but_scheduling_is_not(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    path = EXAMPLES / "finetunejob-suspended.yaml"
    cluster.kubectl("create", "-n", namespace, "-f", str(path))
    name = load(path)["metadata"]["name"]
    old = parse_finetunejob(load(path)).spec
    change = {"task": "sequence-classification", "method": "full", "model": {"source": "hf://org/other"}}
    new = old.model_validate({**old.to_k8s(), **change})
    refused = cluster.kubectl(
        "patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": change}), check=False
    )
    assert refused.returncode != 0
    for field, message in old.immutable_changes(new):
        assert f"spec.{field}: Invalid value: " in refused.stderr
        assert message in refused.stderr
    resume = {"spec": {"scheduling": {"suspend": False}, "hyperparameters": {"maxSteps": 20}}}
    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps(resume))
    stored = parse_finetunejob(kubectl_json(cluster, "get", "ftj", name, "-n", namespace))
    assert stored.spec.scheduling.suspend is False
    assert stored.spec.hyperparameters.max_steps == 20
