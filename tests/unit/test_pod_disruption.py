"""Pods that Kubernetes takes away (eviction, node loss) are disruptions, not trainer failures.

The bodies are shaped like those the dev cluster produced (tests/cluster/test_disruption.py): an evicted
pod whose containers the kubelet (kwok) then stopped with SIGTERM, and a pod whose node was deleted, which
PodGC failed while its container still showed `running`.
"""

from __future__ import annotations

from typing import Any

from finetune_operator.controllers.finetunejob import _failure
from finetune_operator.controllers.summaries import summarize_pod


def trainer_pod(phase: str, state: dict[str, Any], *conditions: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "ftj-a1-0-abcde",
            "labels": {"finetune.dev/attempt": "1"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "trainer"}]},
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True"}, *conditions],
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


EVICTED = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "EvictionByEvictionAPI",
    "message": "Eviction API: evicting",
}
NODE_GONE = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "DeletionByPodGC",
    "message": "PodGC: node no longer exists",
}
SIGTERM = {"terminated": {"exitCode": 143, "reason": "Error"}}


def test_an_evicted_pod_is_disrupted_although_its_container_exited_143() -> None:
    summary = summarize_pod(trainer_pod("Failed", SIGTERM, EVICTED))
    assert summary.disrupted
    assert not summary.failed
    assert summary.terminated
    assert summary.message == "EvictionByEvictionAPI: Eviction API: evicting"
    failure = _failure(None, [summary])
    assert failure is not None
    code, description = failure
    assert code is None, "a disruption is charged as such, not as the SIGTERM exit code"
    assert "pod ftj-a1-0-abcde" in description
    assert "EvictionByEvictionAPI" in description


def test_a_pod_whose_node_was_deleted_is_disrupted_and_names_the_node() -> None:
    summary = summarize_pod(
        trainer_pod("Failed", {"running": {"startedAt": "2026-01-01T00:00:00Z"}}, NODE_GONE)
    )
    assert (summary.disrupted, summary.failed, summary.exit_code) == (True, False, None)
    failure = _failure(None, [summary])
    assert failure is not None
    code, description = failure
    assert code is None
    assert "exit code" not in description
    assert "on node-a" in description
    assert "DeletionByPodGC: PodGC: node no longer exists" in description


def test_disruption_being_prepared_on_a_running_pod_counts_already() -> None:
    summary = summarize_pod(trainer_pod("Running", {"running": {}}, EVICTED))
    assert summary.disrupted
    assert not summary.terminated


def test_a_pod_that_had_completed_is_not_disrupted_afterwards() -> None:
    done = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    summary = summarize_pod(trainer_pod("Succeeded", done, EVICTED))
    assert not summary.disrupted
    assert _failure(None, [summary]) is None


def test_a_false_disruption_condition_and_a_plain_failure_are_not_disruptions() -> None:
    withdrawn = dict(EVICTED, status="False")
    summary = summarize_pod(
        trainer_pod("Failed", {"terminated": {"exitCode": 1, "reason": "Error"}}, withdrawn)
    )
    assert (summary.disrupted, summary.failed, summary.exit_code) == (False, True, 1)
    failure = _failure(None, [summary])
    assert failure is not None
    assert failure[0] == 1


def test_the_disrupted_pod_is_the_cause_not_its_gang_mate_deleted_with_the_job() -> None:
    victim = summarize_pod(trainer_pod("Failed", SIGTERM, EVICTED))
    running = summarize_pod(trainer_pod("Running", {"running": {}}))
    mate = running._replace(name="ftj-a1-1-fghij", deleting=True)
    failure = _failure(None, [mate, victim])
    assert failure is not None
    assert "ftj-a1-0-abcde" in failure[1]
