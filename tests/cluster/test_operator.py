"""The operator process: crash-safety (SIGKILL mid-reconcile, restart, convergence without duplicates),
its Prometheus metrics, and both kinds on the one work queue without kopf state on the objects."""

from __future__ import annotations

import urllib.request
from collections import Counter
from typing import Any

import pytest
import yaml

from tests.cluster.test_finetunejob import (
    CHILD_KINDS,
    EXAMPLES,
    ftj,
    get_ftj,
    gpu_pool_free,
    wait_phase,
)
from tests.kube_helpers import Cluster, kubectl_json, wait_for

pytestmark = pytest.mark.cluster


def test_sigkill_while_reconciling_twenty_jobs_then_restart_converges_without_duplicates(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    gpu_pool_free(cluster)
    running = [ftj(f"run-{i:02d}", gpus=1) for i in range(12)]  # 12 of the 16 fake GPUs
    parked = [ftj(f"parked-{i:02d}", suspend=True) for i in range(8)]
    cluster.apply(running + parked, namespace)

    def some_but_not_all_reconciled() -> bool:
        items = kubectl_json(cluster, "get", "finetunejobs", "-n", namespace)["items"]
        return any((i.get("status") or {}).get("phase") for i in items)

    wait_for(some_but_not_all_reconciled, 60, "the operator to be mid-way through the 20 jobs")
    operator.kill()
    operator.start()

    for item in running:
        body = wait_phase(cluster, namespace, item["metadata"]["name"], "Running", 120)
        assert body["status"]["attempt"] == 1, "a crash must not start a second attempt"
    for item in parked:
        wait_phase(cluster, namespace, item["metadata"]["name"], "Suspended", 120)

    owners = Counter()
    for kind in CHILD_KINDS.split(","):
        for child in kubectl_json(cluster, "get", kind, "-n", namespace, "-l", "finetune.dev/job")["items"]:
            owners[(kind, child["metadata"]["labels"]["finetune.dev/job"])] += 1
    for item in running + parked:
        name = item["metadata"]["name"]
        for kind in CHILD_KINDS.split(","):
            expected = 0 if (kind == "jobs" and name.startswith("parked")) else 1
            assert owners[(kind, name)] == expected, f"{name} has {owners[(kind, name)]} {kind}"
    pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", "finetune.dev/job")["items"]
    per_job = Counter(p["metadata"]["labels"]["finetune.dev/job"] for p in pods)
    assert per_job == {item["metadata"]["name"]: 1 for item in running}


def scrape_metrics(operator: Any) -> dict[str, float]:
    text = urllib.request.urlopen(operator.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("finetune_operator_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_report_reconciles_phases_and_gpus(cluster: Cluster, namespace: str, operator: Any) -> None:
    cluster.apply([ftj("counted", gpus=2), ftj("waiting-one", suspend=True)], namespace)
    wait_phase(cluster, namespace, "counted", "Running")
    wait_phase(cluster, namespace, "waiting-one", "Suspended")
    assert get_ftj(cluster, namespace, "counted")["status"]["admission"]["gpus"] == 2

    def scrape() -> dict[str, float]:
        return scrape_metrics(operator)

    def settled() -> dict[str, float] | None:
        values = scrape()
        phases_ok = (
            values.get('finetune_operator_finetunejobs{phase="Running"}') == 1
            and values.get('finetune_operator_finetunejobs{phase="Suspended"}') == 1
        )
        return values if phases_ok else None

    values = wait_for(settled, 30, "the phase gauges to show 1 Running and 1 Suspended")
    assert values['finetune_operator_reconciles_total{kind="FineTuneJob",result="ok"}'] > 0
    assert values['finetune_operator_reconcile_duration_seconds_count{kind="FineTuneJob"}'] > 0
    assert values["finetune_operator_gpus_admitted"] == 2
    assert values["finetune_operator_gpus_requested"] == 2
    assert "finetune_operator_queue_length" in values
    assert "finetune_operator_time_queued_seconds_count" in values


def test_a_model_deployment_edit_is_reconciled_on_the_shared_queue_and_kopf_keeps_no_state_on_either_kind(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    manifest = yaml.safe_load((EXAMPLES / "modeldeployment-rolling.yaml").read_text())
    name = manifest["metadata"]["name"]
    cluster.apply([manifest, ftj("beside", gpus=0)], namespace)

    def observed(generation: int) -> dict[str, Any] | None:
        body: dict[str, Any] = kubectl_json(cluster, "get", "modeldeployment", name, "-n", namespace)
        status = body.get("status") or {}
        return (
            body if body["metadata"]["generation"] == generation == status.get("observedGeneration") else None
        )

    wait_for(lambda: observed(1), 60, "the ModelDeployment's first status")
    key = 'finetune_operator_reconciles_total{kind="ModelDeployment",result="ok"}'
    before = scrape_metrics(operator)[key]
    assert before >= 1
    cluster.kubectl(
        "patch", "modeldeployment", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":3}}'
    )
    body = wait_for(lambda: observed(2), 60, "the edit (generation 2) to be observed")
    conditions = {c["type"]: c for c in body["status"]["conditions"]}
    assert set(conditions) == {"ModelReady", "Available", "Progressing", "Degraded", "Ready"}
    model_ready = conditions["ModelReady"]
    assert (model_ready["status"], model_ready["reason"]) == ("False", "WaitingForFineTuneJob")
    assert "support-bot-lora" in model_ready["message"]
    assert model_ready["observedGeneration"] == 2
    assert scrape_metrics(operator)[key] > before

    job = wait_phase(cluster, namespace, "beside", "Running")
    for item in (body, job):
        kind = item["kind"]
        assert not any(k.startswith("kopf.") for k in item["metadata"].get("annotations") or {}), kind
        assert not any(f.startswith("kopf.") for f in item["metadata"].get("finalizers") or []), kind
    assert not body["metadata"].get("finalizers"), (
        "a ModelDeployment holds nothing that needs a finalizer yet"
    )
    assert job["metadata"]["finalizers"] == ["finetune.dev/finalizer"]
