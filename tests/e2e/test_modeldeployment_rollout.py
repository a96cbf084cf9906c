"""ModelDeployment rollouts for real: the operator runs as a pod of the dev cluster's local node (installed by
the Helm chart, with its own ServiceAccount and the chart's RBAC), so it reads the server pods' readiness
answers and `/metrics` as in any cluster. One FineTuneJob trains a tiny model on the local node; every
deployment here serves its artifact from its checkpoint claim; a client reaches the pods through the
Service's loopback forwarder (`python -m hack.devcluster services`).

- status carries the quality gate's measured drop and the sizes; a spec change rolls a new revision out
  while a client sends requests throughout, and none fails; deleting removes every child;
- a canary without traffic stays inconclusive (never a pass); with traffic it is promoted step by step to
  100 %, each step in `status.rollout.history` and an Event;
- a canary whose pods answer errors (`runtime.faultErrorRate`) is rolled back by itself;
- last, the whole run (job -> deployments -> rollouts -> deletion) left an audit file (the chart's audit
  persistence) that `audit verify` accepts, with the actions of every step; and the run's Secrets, whose
  values are random markers (the trainer's credentials, the deployments' API keys), appear in no object of
  the namespace, no Event, no pod log and no audit record.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
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
from hack.nodeagent.agent import agent_dir

from tests.kube_helpers import Cluster, LocalNode, kubectl_json, wait_for
from tests.operator_pod import CHECKOUT_PATH, OperatorPod

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "src"
TRAIN_STEPS = 10
LABEL = "finetune.dev/deployment"
CHILD_KINDS = "deployments,services,configmaps,secrets,poddisruptionbudgets,networkpolicies,pods"
PROMPT = "word: kqzt\nfirst:"
READY_TIMEOUT = 420.0
CREDENTIALS = "trainer-credentials"
API_KEYS = "client-api-keys"
#: The values of the run's Secrets: random markers that must show up nowhere else.
CREDENTIAL_VALUES = {
    "HF_TOKEN": f"hf_{secrets.token_hex(16)}",
    "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
}
API_KEY = f"sk-{secrets.token_hex(16)}"


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
            "credentialsSecret": CREDENTIALS,
        },
    }


def secret(name: str, values: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": values}


@pytest.fixture(scope="module")
def trained(
    cluster: Cluster, operator_pod: OperatorPod, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The FineTuneJob `src`, trained to Succeeded by the operator pod on the local node: its artifact is
    what every deployment of this module serves. Its trainer gets the credentials Secret (`envFrom`) and
    every deployment takes its API key from `client-api-keys`: both hold random markers."""
    cluster.apply(
        [secret(CREDENTIALS, CREDENTIAL_VALUES), secret(API_KEYS, {"api-keys": API_KEY})],
        operator_pod.namespace,
    )
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
            "auth": {"apiKeySecretRef": {"name": API_KEYS, "key": "api-keys"}},
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


def audit(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m finetune_operator audit ARGS` of this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_operator", "audit", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONPATH": CHECKOUT_PATH},
    )


def namespace_objects(cluster: Cluster, namespace: str) -> str:
    """Every listable namespaced object but Secrets (ConfigMaps, our kinds with their status, pods,
    Deployments, Events...), as JSON."""
    kinds = cluster.kubectl("api-resources", "--namespaced", "--verbs=list", "-o", "name").stdout.split()
    listed = [k for k in kinds if k.split(".")[0] != "secrets"]
    return cluster.kubectl("get", ",".join(listed), "-n", namespace, "-o", "json", timeout=180).stdout


def pod_logs(local_node: LocalNode, namespace: str) -> dict[str, str]:
    """The node agent's log file of every container run in `namespace` (each pod's until it is deleted)."""
    logs = agent_dir(local_node.root) / "logs"
    return {
        str(path.relative_to(logs)): path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(logs.glob(f"{namespace}_*/*/*.log"))
    }


def test_the_full_run_leaves_an_audit_log_that_verifies_and_no_secret_value_anywhere(
    cluster: Cluster,
    local_node: LocalNode,
    operator_pod: OperatorPod,
    trained: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Runs last: the module's job, rollouts and rollback are done. Deletes what is left, then checks the
    audit files of the chart's audit claim and scans everything the run produced for the Secrets' markers."""
    ns = operator_pod.namespace
    started = time.monotonic()
    for name, values in ((CREDENTIALS, CREDENTIAL_VALUES), (API_KEYS, {"api-keys": API_KEY})):
        data = get(cluster, ns, "secret", name)["data"]
        assert {k: base64.b64decode(v).decode() for k, v in data.items()} == values, name  # what we look for
    # What exists now (before the deletions below remove the objects, their status and their pods' logs).
    scanned = {"objects before deletion": namespace_objects(cluster, ns), **pod_logs(local_node, ns)}
    present = [n for n in ("canary", "faulty") if n in children_owners(cluster, ns)]
    for kind, name in [*(("modeldeployment", n) for n in present), ("finetunejob", JOB)]:
        cluster.kubectl("delete", kind, name, "-n", ns, "--timeout=120s", timeout=150)
    folder = operator_pod.audit_dir()

    def deleted_recorded() -> list[dict[str, Any]] | None:
        out = audit("query", str(folder), "--action", "Deleted", "-o", "jsonl")
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        return records if {r["name"] for r in records} >= {"rolling", *present, JOB} else None

    deletions = wait_for(deleted_recorded, 60, "a Deleted audit record for each resource", interval=1)
    scanned_at = time.monotonic()

    # (1) The audit log (a copy: the operator still runs and may append) verifies and holds every step.
    copy = tmp_path / "audit"
    shutil.copytree(folder, copy)
    verified = audit("verify", str(copy))
    assert verified.returncode == 0, f"{verified.stdout}{verified.stderr}"
    print("audit verify:", verified.stdout.strip(), f"({sorted(p.name for p in copy.iterdir())})")
    out = audit("query", str(copy), "--checkpoints", "-o", "jsonl")
    assert out.returncode == 0, out.stderr
    everything = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert verified.stdout.startswith(f"OK: {len(everything)} records"), (verified.stdout, len(everything))
    records = [r for r in everything if r["type"] != "checkpoint"]
    verbs: dict[str, set[str]] = {}
    for record in records:
        verbs.setdefault(f"{record['kind']}/{record['name']}", set()).add(record["verb"])
    print("audit actions:", json.dumps({k: sorted(v) for k, v in sorted(verbs.items())}))
    assert {"GangAdmitted", "ChildrenApplied", "Completed", "Deleted"} <= verbs[f"FineTuneJob/{JOB}"], verbs
    for name in ("rolling", "canary", "faulty"):
        assert {"ModelLoaded", "RollingUpdate", "RolloutComplete", "Deleted"} <= verbs[
            f"ModelDeployment/{name}"
        ]
    assert "Promoting" in verbs["ModelDeployment/canary"], verbs
    assert "RolledBack" in verbs["ModelDeployment/faulty"], verbs
    assert {r["user"] for r in records} == {"system:finetune-operator"}, {r["user"] for r in records}
    assert len(deletions) == len({r["name"] for r in deletions}), deletions

    # (2) No Secret value anywhere the run wrote: objects (ConfigMaps, every status), Events, the
    # operator's log and audit stdout, every pod's log (trainer, servers, operator), the audit files.
    scanned["objects after deletion"] = namespace_objects(cluster, ns)
    scanned["operator log (kubectl logs)"] = operator_pod.logs(tail=-1)
    scanned.update(pod_logs(local_node, ns))
    for path in sorted(copy.iterdir()):
        scanned[f"audit file {path.name}"] = path.read_text(encoding="utf-8")
    markers = [API_KEY, *CREDENTIAL_VALUES.values()]
    found = [(where, m) for where, text in scanned.items() for m in markers if m in text]
    assert found == [], found
    configmaps = json.loads(scanned["objects before deletion"])["items"]
    kinds = Counter(item["kind"] for item in configmaps)
    assert kinds["ConfigMap"], kinds
    assert kinds["Event"], kinds
    assert kinds["Pod"], kinds
    assert any("trainer" in name for name in scanned), sorted(scanned)
    print(
        f"scanned {len(scanned)} sources {sorted(scanned)} "
        f"({sum(len(t) for t in scanned.values())} characters; "
        f"objects before deletion: {dict(kinds)}) for {len(markers)} markers; "
        f"deletion {scanned_at - started:.1f} s, checks {time.monotonic() - scanned_at:.1f} s"
    )


def children_owners(cluster: Cluster, namespace: str) -> list[str]:
    listing = kubectl_json(cluster, "get", "modeldeployments", "-n", namespace)
    return [item["metadata"]["name"] for item in listing["items"]]
