"""A FineTuneJob whose spec the typed model refuses fails with `InvalidSpec` and then ends like every other
failed job: nothing created, GPUs released, status committed, one Warning, deleted after its TTL.

Such an object cannot be created through our CRD; it is on the API server when it was stored under a looser
schema (before the schema tightened, or under a CRD another tool installed). That is how it gets there
here: the real CRD with one constraint relaxed (`spec.task`'s enum accepts one more value) is applied, the
job created, and the real CRD from crds/ applied again at once. The API server does not revalidate stored
objects on read, and updates keep the unchanged invalid field (validation ratcheting), so the operator
reconciles it under the real CRD."""

from __future__ import annotations

import copy
import re
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import yaml

from tests.kube_helpers import REPO_ROOT, Cluster, KubectlError, OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster

CRD_FILE = REPO_ROOT / "crds" / "finetunejobs.finetune.dev.yaml"
FIELD_MANAGER = "fto-tests"  # the `crds` fixture's: the real CRD is re-applied under the same manager
TASK_NO_LONGER_OFFERED = "speech-recognition"
TTL_SECONDS = 10  # long enough to read the failed job before it goes
NAME = "bad"


def task_enums(crd: dict[str, Any]) -> Iterator[list[str]]:
    """`spec.task`'s enum in each served version of the CRD (the lists themselves, to edit in place)."""
    for version in crd["spec"]["versions"]:
        yield version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["task"]["enum"]


def apply_crd(cluster: Cluster, crd: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "-f=-",
        input=yaml.safe_dump(crd),
    )


def create_under_loosened_crd(cluster: Cluster, namespace: str, job: dict[str, Any]) -> None:
    """Create `job` while the cluster serves the CRD with `spec.task`'s enum relaxed; the real CRD is
    back when this returns (or raises), since other tests share the cluster."""
    (real,) = yaml.safe_load_all(CRD_FILE.read_text())
    loosened = copy.deepcopy(real)
    for enum in task_enums(loosened):
        assert TASK_NO_LONGER_OFFERED not in enum
        enum.append(TASK_NO_LONGER_OFFERED)
    refusals: list[str] = []

    def created() -> bool:
        # Applied on every try: the API server takes a moment to serve the new schema, and another test
        # session's `crds` fixture may put the real CRD back meanwhile.
        apply_crd(cluster, loosened)
        try:
            cluster.kubectl("create", "-n", namespace, "-f=-", input=yaml.safe_dump(job))
        except KubectlError as err:
            refusals.append(str(err))
            return False
        return True

    try:
        wait_for(created, 30, "the FineTuneJob to be accepted under the loosened CRD", interval=0.2)
    except AssertionError as err:
        raise AssertionError(f"{err}; last refusal: {refusals[-1:]}") from None
    finally:
        apply_crd(cluster, real)
        served = kubectl_json(cluster, "get", "crd", real["metadata"]["name"])
        assert list(task_enums(served)) == list(task_enums(real)), "the real CRD was not restored"
    # The real CRD is served again: the same job is refused now (so it is stored only because it was
    # created under the loosened one).
    refused = cluster.kubectl(
        "create", "-n", namespace, "--dry-run=server", "-f=-", input=yaml.safe_dump(job), check=False
    )
    assert refused.returncode != 0
    assert "spec.task" in refused.stderr, refused.stderr
    assert "Unsupported value" in refused.stderr, refused.stderr


def invalid_job() -> dict[str, Any]:
    """Valid in every other respect (8 GPUs, so that GPUs would be counted if it were treated as live)."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": NAME},
        "spec": {
            "task": TASK_NO_LONGER_OFFERED,
            "model": {"source": "hf://org/tiny"},
            "dataset": {"source": "pvc://data/train.jsonl"},
            "distributed": {"nodes": 1, "gpusPerNode": 8},
            "scheduling": {"ttlSecondsAfterFinished": TTL_SECONDS},
        },
    }


def namespace_objects(cluster: Cluster, namespace: str) -> set[str]:
    """Every object of the kinds a FineTuneJob's children have, and pods."""
    kinds = "pods,jobs,serviceaccounts,roles,rolebindings,configmaps,secrets,services,persistentvolumeclaims"
    return set(cluster.kubectl("get", kinds, "-n", namespace, "-o", "name").stdout.split())


def events_of(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={NAME}"
    items = kubectl_json(cluster, "get", "events", "-n", namespace, "--field-selector", selector)["items"]
    return list(items)


def metric(operator: OperatorProcess, sample: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(operator.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert found, f"no sample {sample} in the operator's metrics"
    return float(found.group(1))


def test_a_job_the_typed_model_refuses_fails_with_invalid_spec_and_goes_after_its_ttl(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    before = namespace_objects(cluster, namespace)
    create_under_loosened_crd(cluster, namespace, invalid_job())

    def failed() -> dict[str, Any] | None:
        body: dict[str, Any] = kubectl_json(cluster, "get", "finetunejob", NAME, "-n", namespace)
        return body if (body.get("status") or {}).get("phase") == "Failed" else None

    status = wait_for(failed, 30, f"FineTuneJob {NAME} to be Failed")["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == "True"
    assert conditions["Failed"]["reason"] == "InvalidSpec"
    assert "spec.task" in conditions["Failed"]["message"], conditions["Failed"]["message"]
    assert conditions["Running"]["status"] == "False"
    assert "Admitted" not in conditions
    assert status["observedGeneration"] == 1
    completed = datetime.fromisoformat(status["completionTime"])

    # Nothing was made for it, and it holds no GPUs.
    assert namespace_objects(cluster, namespace) == before
    assert metric(operator, 'finetune_operator_finetunejobs{phase="Failed"}') == 1
    assert metric(operator, "finetune_operator_gpus_requested") == 0
    assert metric(operator, "finetune_operator_gpus_admitted") == 0

    (event,) = wait_for(lambda: events_of(cluster, namespace), 30, "the job's Event")
    assert (event["type"], event["reason"]) == ("Warning", "InvalidSpec")
    assert "spec.task" in event["message"], event["message"]

    # Deleted once its TTL has run out, not before.
    wait_for(
        lambda: not cluster.kubectl("get", "finetunejob", "-n", namespace, "-o", "name").stdout.strip(),
        TTL_SECONDS + 30,
        f"FineTuneJob {NAME} to be deleted after its TTL ({TTL_SECONDS}s)",
    )
    assert datetime.now(completed.tzinfo) >= completed + timedelta(seconds=TTL_SECONDS)
    # The reconcile at the TTL (finding it failed) posted no second Event.
    assert [(e["type"], e["reason"], e.get("count", 1)) for e in events_of(cluster, namespace)] == [
        ("Warning", "InvalidSpec", 1)
    ]
    assert namespace_objects(cluster, namespace) == before
