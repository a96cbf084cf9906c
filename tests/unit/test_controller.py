"""Pure parts of the FineTuneJob controller: conditions and phase, failure mapping, backoff, work queue."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from finetune_operator.api.conditions import set_condition
from finetune_operator.api.finetunejob_status import derive_phase
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import _failure, restart_delay
from finetune_operator.controllers.summaries import (
    JobSummary,
    PodSummary,
    exit_code_from_message,
    summarize_job,
    summarize_pod,
)
from finetune_operator.controllers.work_queue import WorkQueue as ReconcileQueue

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pod(name: str = "p", phase: str = "Running", code: int | None = None, **kw: object) -> PodSummary:
    values: dict[str, object] = {
        "name": name,
        "attempt": 1,
        "rank": "0",
        "phase": phase,
        "node": "n0",
        "gpus": 8,
        "exit_code": code,
        "message": "",
        "disrupted": False,
        "deleting": False,
    }
    values.update(kw)
    return PodSummary(**values)  # type: ignore[arg-type]


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], "Running", True, "AllPodsRunning", "2 of 2", generation=1, now=T0)
    later = T0 + timedelta(minutes=5)
    same = set_condition(first, "Running", True, "AllPodsRunning", "still", generation=2, now=later)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["observedGeneration"] == 2
    flipped = set_condition(same, "Running", False, "Restarting", "x", generation=2, now=later)
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def test_phase_is_derived_from_conditions() -> None:
    def with_(*items: tuple[str, bool, str]) -> list[dict[str, object]]:
        conditions: list[dict[str, object]] = []
        for type_, status, reason in items:
            conditions = set_condition(conditions, type_, status, reason, "", generation=1, now=T0)
        return conditions

    assert derive_phase([]) == "Pending"
    assert derive_phase(with_(("Admitted", False, "InsufficientGPUs"))) == "Queued"
    assert (
        derive_phase(with_(("Admitted", True, "GangAdmitted"), ("Running", True, "AllPodsRunning")))
        == "Running"
    )
    assert derive_phase(with_(("Admitted", True, "x"), ("Running", False, "Restarting"))) == "Restarting"
    assert derive_phase(with_(("Admitted", True, "x"), ("Running", False, "Starting"))) == "Pending"
    assert (
        derive_phase(with_(("Suspended", True, "Suspended"), ("Admitted", False, "Suspended"))) == "Suspended"
    )
    assert derive_phase(with_(("Running", True, "x"), ("Failed", True, "DeadlineExceeded"))) == "Failed"
    assert derive_phase(with_(("Succeeded", True, "Completed"))) == "Succeeded"


def test_failure_prefers_a_non_retryable_exit_code() -> None:
    failure = _failure(None, [pod("a", "Failed", 1), pod("b", "Failed", 4), pod("c")])
    assert failure is not None
    assert failure[0] == 4
    assert "pod b" in failure[1]
    assert _failure(None, [pod("a"), pod("b", "Succeeded", 0)]) is None


def test_disruption_and_unexpected_deletion_are_failures_without_a_code() -> None:
    disrupted = _failure(None, [pod(disrupted=True, message="Evicted by the taint manager")])
    assert disrupted is not None
    assert disrupted[0] is None
    assert "disrupted" in disrupted[1]
    deleted = _failure(None, [pod(deleting=True)])
    assert deleted is not None
    assert "deleted" in deleted[1]


def test_job_failure_message_gives_the_exit_code() -> None:
    message = "Container trainer for pod ns/p-0 failed with exit code 3 matching FailJob rule at index 0"
    assert exit_code_from_message(message) == 3
    job = JobSummary("j-a1", 1, False, True, "PodFailurePolicy", message, False, False)
    failure = _failure(job, [])
    assert failure is not None
    assert failure[0] == 3


def test_summaries_read_kubernetes_bodies() -> None:
    job = summarize_job(
        {
            "metadata": {"name": "j-a2", "labels": {"finetune.dev/attempt": "2"}},
            "spec": {"suspend": True},
            "status": {
                "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
            },
        }
    )
    assert (job.attempt, job.failed, job.reason, job.suspended) == (2, True, "BackoffLimitExceeded", True)
    summary = summarize_pod(
        {
            "metadata": {
                "name": "j-a2-1-x",
                "labels": {"finetune.dev/attempt": "2"},
                "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
            },
            "spec": {
                "nodeName": "gpu-node-1",
                "containers": [{"name": "trainer", "resources": {"requests": {"nvidia.com/gpu": "8"}}}],
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "trainer", "state": {"terminated": {"exitCode": 5, "reason": "Error"}}}
                ],
            },
        }
    )
    assert (summary.rank, summary.node, summary.gpus, summary.exit_code, summary.failed) == (
        "1",
        "gpu-node-1",
        8,
        5,
        True,
    )


def test_restart_backoff_doubles_up_to_the_cap() -> None:
    assert [restart_delay(10, n, 600) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert restart_delay(10, 20, 600) == 600
    assert restart_delay(0, 3, 600) == 0


def test_queue_never_runs_one_key_twice_at_once_and_coalesces() -> None:
    async def scenario() -> tuple[int, list[str]]:
        running: set[str] = set()
        calls: list[str] = []
        overlap = 0
        gate = asyncio.Event()

        async def reconcile(key: str) -> float | None:
            nonlocal overlap
            if key in running:
                overlap += 1
            running.add(key)
            calls.append(key)
            await gate.wait()
            running.discard(key)
            return None

        queue = ReconcileQueue(reconcile, workers=4)
        queue.start()
        queue.enqueue("ns/a")
        await asyncio.sleep(0.01)
        for _ in range(5):  # while a is running: coalesced into one more run
            queue.enqueue("ns/a")
        queue.enqueue("ns/b")
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.sleep(0.05)
        await queue.stop()
        return overlap, calls

    overlap, calls = asyncio.run(scenario())
    assert overlap == 0
    assert calls.count("ns/a") == 2
    assert calls.count("ns/b") == 1


def test_queue_retries_failures_and_honours_requeue_delays() -> None:
    async def scenario() -> list[str]:
        calls: list[str] = []

        async def reconcile(key: str) -> float | None:
            calls.append(key)
            if len(calls) == 1:
                raise RuntimeError("transient")
            return 0.05 if len(calls) == 2 else None

        queue = ReconcileQueue(reconcile, workers=1)
        queue.start()
        queue.enqueue("ns/x")
        await asyncio.sleep(1.5)  # first retry after ~1 s, then the 0.05 s requeue
        await queue.stop()
        return calls

    assert asyncio.run(scenario()) == ["ns/x", "ns/x", "ns/x"]


def test_operator_config_reads_documented_environment_variables() -> None:
    config = OperatorConfig.from_env(
        {
            "FTO_TRAINER_IMAGE": "img:1",
            "FTO_GPU_QUOTA_PER_NAMESPACE": "team-a=16, team-b=8",
            "FTO_WORKERS": "4",
        }
    )
    assert config.trainer_image == "img:1"
    assert config.gpu_quota_per_namespace == {"team-a": 16, "team-b": 8}
    assert config.workers == 4
    assert OperatorConfig.from_env({}).gpu_quota_per_namespace == {}
    for name, field in OperatorConfig.model_fields.items():
        assert f"FTO_{name.upper()}" in (field.description or ""), f"{name} is undocumented"
