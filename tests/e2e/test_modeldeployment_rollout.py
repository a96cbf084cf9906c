"""ModelDeployment rollouts for real: the operator runs as a pod of the dev cluster's local node (installed by
the Helm chart, with its own ServiceAccount and the chart's RBAC), so it reads the server pods' readiness
answers and `/metrics` as in any cluster. One FineTuneJob trains a tiny model on the local node; every
deployment here serves its artifact from its checkpoint claim; a client reaches the pods through the
Service's loopback forwarder (`python -m hack.devcluster services`).

- status carries the quality gate's measured drop and the sizes; a spec change rolls a new revision out
  while a client sends requests throughout, and none fails; deleting removes every child;
- a canary without traffic stays inconclusive (never a pass); with traffic it is promoted step by step to
  100 %, each step in `status.rollout.history` and an Event;
- a canary whose pods answer errors (`runtime.faultErrorRate`) is rolled back by itself.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hack import nodeagent
from hack.make_tiny_model import make_tiny_assets

from tests.kube_helpers import Cluster, LocalNode, kubectl_json, wait_for
from tests.operator_pod import OperatorPod

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "src"
TRAIN_STEPS = 10
LABEL = "finetune.dev/deployment"
CHILD_KINDS = "deployments,services,configmaps,secrets,poddisruptionbudgets,networkpolicies,pods"
PROMPT = "word: kqzt\nfirst:"
READY_TIMEOUT = 420.0


def finetunejob(model: Path, data: Path) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "task": "causal-lm",
            "model": {"source": f"file://{model}"},
            "dataset": {
                "source": f"file://{data}",
                "format": "jsonl",
                "fieldMapping": {"prompt": "prompt", "completion": "completion"},
                "split": {"validationRatio": 0.1, "testRatio": 0.1, "seed": 1},
            },
            "method": "full",
            "hyperparameters": {
                "maxSteps": TRAIN_STEPS,
                "batchSize": 8,
                "learningRate": 0.003,
                "warmupSteps": 2,
                "maxSeqLength": 64,
            },
            "evaluation": {"everySteps": TRAIN_STEPS},
            "checkpointing": {"everySteps": TRAIN_STEPS, "storage": {"size": "1Gi"}},
            "distributed": {"nodes": 1, "gpusPerNode": 1, "precision": "fp32"},
            "resources": {
                "nodeSelector": dict(nodeagent.NODE_SELECTOR),
                "tolerations": [dict(nodeagent.TOLERATION)],
            },
        },
    }


@pytest.fixture(scope="module")
def trained(
    cluster: Cluster, operator_pod: OperatorPod, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The FineTuneJob `src`, trained to Succeeded by the operator pod on the local node: its artifact is
    what every deployment of this module serves."""
    tiny = make_tiny_assets(tmp_path_factory.mktemp("tiny"))
    cluster.apply(finetunejob(tiny.model_dir, tiny.data_path), operator_pod.namespace)

    def succeeded() -> dict[str, Any] | None:
        job = get(cluster, operator_pod.namespace, "finetunejob", JOB)
        if condition(job, "Failed").get("status") == "True":
            raise AssertionError(f"FineTuneJob {JOB} failed: {job['status']}\n{operator_pod.logs()}")
        return job if condition(job, "Succeeded").get("status") == "True" else None

    job = wait_for(succeeded, 600, f"FineTuneJob {JOB} Succeeded", interval=2)
    assert job["status"]["artifact"]["uri"].startswith("pvc://"), job["status"]
    return job


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = kubectl_json(cluster, "get", kind, name, "-n", namespace)
    return body


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def modeldeployment(name: str, **spec: Any) -> dict[str, Any]:
    placement = LocalNode.placement()
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"fromFineTuneJob": JOB},
            "runtime": {"maxNewTokens": 2},
            "quantization": {"method": "int8-dynamic", "maxQualityDrop": 0.05},
            "replicas": 1,
            "resources": {
                "cpu": "250m",
                "memory": "1Gi",
                "nodeSelector": placement["nodeSelector"],
                "tolerations": placement["tolerations"],
            },
            **spec,
        },
    }


def wait_ready(cluster: Cluster, pod: OperatorPod, name: str) -> dict[str, Any]:
    namespace = pod.namespace

    def ready() -> dict[str, Any] | None:
        body = get(cluster, namespace, "modeldeployment", name)
        if condition(body, "Degraded").get("status") == "True":
            raise AssertionError(f"{name} Degraded: {body['status']}")
        return body if condition(body, "Ready").get("status") == "True" else None

    try:
        return wait_for(ready, READY_TIMEOUT, f"ModelDeployment {name} Ready", interval=2)
    except AssertionError:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        body = cluster.kubectl("get", "modeldeployment", name, "-n", namespace, "-o", "yaml", check=False)
        print(f"{pods}\n{body.stdout}\n----- operator -----\n{pod.logs()}")
        raise


def wait_status(
    cluster: Cluster, namespace: str, name: str, predicate: Any, timeout: float, message: str
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        last = get(cluster, namespace, "modeldeployment", name)
        return last if predicate(last.get("status") or {}) else None

    try:
        return wait_for(check, timeout, message, interval=1)
    except AssertionError as err:
        raise AssertionError(f"{err}; status: {json.dumps(last.get('status'), indent=1)}") from None


def patch_spec(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch", "modeldeployment", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec})
    )


def children(cluster: Cluster, namespace: str, name: str) -> list[str]:
    listing = kubectl_json(cluster, "get", CHILD_KINDS, "-n", namespace, "-l", f"{LABEL}={name}")
    return [f"{item['kind']}/{item['metadata']['name']}" for item in listing["items"]]


def pods_by_revision(cluster: Cluster, namespace: str, name: str) -> Counter[str]:
    pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", f"{LABEL}={name}")["items"]
    return Counter(p["metadata"]["labels"].get("finetune.dev/revision", "") for p in pods)


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl_json(
        cluster, "get", "events", "-n", namespace,
        "--field-selector", f"involvedObject.kind=ModelDeployment,involvedObject.name={name}",
    )["items"]  # fmt: skip
    return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


def api_key(cluster: Cluster, namespace: str, body: dict[str, Any]) -> str:
    secret = get(cluster, namespace, "secret", body["status"]["apiKeySecret"])
    return base64.b64decode(secret["data"]["api-keys"]).decode().split()[0]


@dataclass
class Client:
    """Sends completions one after another through the Service's forwarder, with no retry: each answer
    (status code, or the connection error) is kept. Each request on a new connection: a Service balances
    connections, not requests (the forwarder as kube-proxy does), and one kept-alive connection would stay
    on one pod and never reach a canary."""

    url: str
    key: str
    model: str
    answers: list[int | str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=60, trust_env=False) as http:
            while not self.stop.is_set():
                try:
                    reply = http.post(
                        f"{self.url}/v1/completions",
                        headers={"Authorization": f"Bearer {self.key}", "Connection": "close"},
                        json={"model": self.model, "prompt": PROMPT, "max_tokens": 2},
                    )
                    self.answers.append(reply.status_code)
                except httpx.HTTPError as err:
                    self.answers.append(f"{type(err).__name__}: {err}")
                time.sleep(0.05)

    @property
    def failures(self) -> list[int | str]:
        return [a for a in self.answers if a != 200]

    def wait_answers(self, count: int, timeout: float = 120.0) -> None:
        start = len(self.answers)
        wait_for(lambda: len(self.answers) - start >= count, timeout, f"{count} answers to the client")


@contextmanager
def sending(
    cluster: Cluster, local_node: LocalNode, namespace: str, body: dict[str, Any]
) -> Iterator[Client]:
    name = body["metadata"]["name"]
    client = Client(
        local_node.service_address(namespace, name, "http"), api_key(cluster, namespace, body), name
    )
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        yield client
    finally:
        client.stop.set()
        thread.join(90)


def test_status_shows_the_measured_gate_and_a_new_revision_rolls_out_with_no_failed_request(
    cluster: Cluster, local_node: LocalNode, operator_pod: OperatorPod, trained: dict[str, Any]
) -> None:
    ns = operator_pod.namespace
    cluster.apply(modeldeployment("rolling"), ns)
    body = wait_ready(cluster, operator_pod, "rolling")
    status = body["status"]
    assert status["model"]["fineTuneJob"] == JOB
    assert status["model"]["uri"] == trained["status"]["artifact"].get(
        "claimUri", trained["status"]["artifact"]["uri"]
    )
    gate = status["quantization"]
    print("quantization status:", json.dumps(gate))
    # The operator read the server's readiness answer itself (not only the pod's Ready condition).
    model_ready = condition(body, "ModelReady")
    assert model_ready["reason"] == "ModelLoaded", model_ready
    assert "perplexity" in model_ready["message"], model_ready
    assert (gate["method"], gate["metric"], gate["passed"]) == ("int8-dynamic", "perplexity", True)
    assert gate["maxQualityDrop"] == 0.05
    assert gate["qualityDrop"] <= 0.05
    assert gate["value"] > 0
    assert gate["baseline"] > 0
    assert 0 < gate["sizeBytes"] < gate["originalSizeBytes"]
    first = status["rollout"]["stableRevision"]

    with sending(cluster, local_node, ns, body) as client:
        client.wait_answers(5)
        patch_spec(cluster, ns, "rolling", {"runtime": {"maxNewTokens": 3}})

        def rolled(s: dict[str, Any]) -> bool:
            return (s.get("rollout") or {}).get("stableRevision") not in (None, first)

        second = wait_status(cluster, ns, "rolling", rolled, 60, "a new stable revision")["status"][
            "rollout"
        ]["stableRevision"]
        wait_for(
            lambda: pods_by_revision(cluster, ns, "rolling") == Counter({second: 1}),
            READY_TIMEOUT,
            f"only the new revision's pod ({second}) left",
            interval=1,
        )
        wait_ready(cluster, operator_pod, "rolling")
        client.wait_answers(5)
    assert len(client.answers) >= 10
    assert client.failures == [], f"{len(client.failures)} of {len(client.answers)} requests failed"
    print(f"rolling update: {len(client.answers)} requests, none failed")

    cluster.kubectl("delete", "modeldeployment", "rolling", "-n", ns, "--timeout=120s", timeout=150)
    wait_for(lambda: not children(cluster, ns, "rolling"), 120, "every child of `rolling` gone", interval=1)


CANARY = {
    "strategy": "Canary",
    "canary": {
        "steps": [{"weight": 25, "pauseSeconds": 5}, {"weight": 50, "pauseSeconds": 5}],
        "analysis": {"intervalSeconds": 3, "minRequests": 5, "maxErrorRate": 0.1},
    },
}


def test_a_canary_without_traffic_is_inconclusive_then_is_promoted_step_by_step_to_100_percent(
    cluster: Cluster, local_node: LocalNode, operator_pod: OperatorPod, trained: dict[str, Any]
) -> None:
    ns = operator_pod.namespace
    cluster.apply(modeldeployment("canary", rollout=CANARY), ns)
    body = wait_ready(cluster, operator_pod, "canary")
    first = body["status"]["rollout"]["stableRevision"]
    patch_spec(cluster, ns, "canary", {"runtime": {"maxNewTokens": 3}})

    # No client yet: the canary's pods answer nothing, so every reading is inconclusive and, long past the
    # step's pause, it is still not promoted.
    def inconclusive(s: dict[str, Any]) -> bool:
        rollout = s.get("rollout") or {}
        return (rollout.get("analysis") or {}).get("verdict") == "Inconclusive" and rollout.get(
            "canaryRevision"
        )

    status = wait_status(cluster, ns, "canary", inconclusive, READY_TIMEOUT, "an inconclusive analysis")[
        "status"
    ]
    second = status["rollout"]["canaryRevision"]
    assert second != first
    time.sleep(10)  # two pauses and several analysis intervals
    status = get(cluster, ns, "modeldeployment", "canary")["status"]
    rollout = status["rollout"]
    assert rollout["step"] == 0, rollout
    assert rollout["canaryRevision"] == second, rollout
    assert rollout["analysis"]["verdict"] == "Inconclusive", rollout["analysis"]
    assert rollout["analysis"]["requests"] < 5
    decisions = [h["decision"] for h in rollout["history"] if h["revision"] == second]
    assert decisions[0] == "Started", decisions
    assert not {"Promoted", "Completed"} & set(decisions), decisions

    with sending(cluster, local_node, ns, body) as client:

        def completed(s: dict[str, Any]) -> bool:
            rollout = s.get("rollout") or {}
            return rollout.get("stableRevision") == second and not rollout.get("canaryRevision")

        status = wait_status(cluster, ns, "canary", completed, READY_TIMEOUT, "the canary promoted to 100 %")[
            "status"
        ]
        wait_for(
            lambda: pods_by_revision(cluster, ns, "canary") == Counter({second: 1}),
            READY_TIMEOUT,
            "only the promoted revision's pod left",
            interval=1,
        )
    history = [
        (h["decision"], h["step"], h["weight"])
        for h in status["rollout"]["history"]
        if h["revision"] == second
    ]
    print("canary history:", history)
    decisions = [d for d, _, _ in history]
    assert history[0][:2] == ("Started", 0), history
    assert ("Promoted", 1, 50) in history, history
    assert (history[-1][0], history[-1][2]) == ("Completed", 100), history
    assert "RolledBack" not in decisions
    reasons = [e["reason"] for e in events(cluster, ns, "canary")]
    assert {"CanaryStarted", "AnalysisPassed", "CanaryCompleted"} <= set(reasons), reasons
    assert client.failures == [], f"{len(client.failures)} of {len(client.answers)} requests failed"


def test_a_canary_whose_pods_answer_errors_is_rolled_back(
    cluster: Cluster, local_node: LocalNode, operator_pod: OperatorPod, trained: dict[str, Any]
) -> None:
    ns = operator_pod.namespace
    cluster.apply(modeldeployment("faulty", rollout=CANARY), ns)
    body = wait_ready(cluster, operator_pod, "faulty")
    first = body["status"]["rollout"]["stableRevision"]
    with sending(cluster, local_node, ns, body) as client:
        client.wait_answers(3)
        patch_spec(cluster, ns, "faulty", {"runtime": {"maxNewTokens": 2, "faultErrorRate": 1.0}})

        def rolled_back(s: dict[str, Any]) -> bool:
            return bool((s.get("rollout") or {}).get("failedRevision"))

        status = wait_status(cluster, ns, "faulty", rolled_back, READY_TIMEOUT, "the canary rolled back")[
            "status"
        ]
        failed = status["rollout"]["failedRevision"]
        assert failed != first
        assert status["rollout"]["stableRevision"] == first
        wait_for(
            lambda: pods_by_revision(cluster, ns, "faulty") == Counter({first: 1}),
            120,
            "the canary's pods gone",
            interval=1,
        )
        errors_seen = len(client.failures)
        after_rollback = len(client.answers)
        client.wait_answers(5)
    assert errors_seen > 0, "the canary answered no error"
    assert all(a == 200 for a in client.answers[after_rollback:]), client.answers[after_rollback:]
    last = status["rollout"]["history"][-1]
    assert (last["decision"], last["revision"], last["reason"]) == ("RolledBack", failed, "AnalysisFailed"), (
        last
    )
    assert status["rollout"]["analysis"]["verdict"] == "Fail"
    warnings = [e for e in events(cluster, ns, "faulty") if e["type"] == "Warning"]
    assert any(e["reason"] == "AnalysisFailed" for e in warnings), warnings
    print("rollback:", last["message"])
