"""The ModelDeployment reconciler on the dev cluster: a deployment from a Succeeded FineTuneJob creates its
children and reports status; a spec change is a new revision; a canary that can't show evidence is rolled
back after its bound; deleting the deployment removes everything.

The server pods land on kwok nodes here: kwok plays their kubelet and reports them Ready, but nothing answers
HTTP. So the operator sees what it sees of a pod it can't reach: Ready by its readiness probe (`ModelReady`
reason `ServerReady`, without the quality gate's figures), and a canary that never shows a request. Serving
pods (real processes on the dev cluster's local node) are the e2e tests'.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.kube_helpers import REPO_ROOT, Cluster, kubectl_json, wait_for

SERVED_KINDS = "deployments,services,configmaps,secrets,poddisruptionbudgets,networkpolicies"
LABEL = "finetune.dev/deployment"


def finetunejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "model": {"source": "file:///models/tiny"},
            "dataset": {"source": "file:///data/tiny.jsonl"},
            "distributed": {"nodes": 1, "gpusPerNode": 0},
            "resources": {"cpu": "1", "memory": "1Gi"},
            "scheduling": {"suspend": True},
        },
    }


def modeldeployment(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"resources": {"cpu": "100m", "memory": "128Mi"}, **spec},
    }


def succeed(cluster: Cluster, namespace: str, job: str, model_uri: str | None) -> None:
    """Mark the FineTuneJob Succeeded with an artifact, as its trainer and the operator would (None: as if
    the trainer's last status report was lost)."""
    status: dict[str, Any] = {
        "phase": "Succeeded",
        "conditions": [
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "TrainingComplete",
                "message": "done",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
    }
    if model_uri is not None:
        status["artifact"] = {"uri": model_uri, "claimUri": model_uri, "format": "full", "sha256": "ab" * 32}
    cluster.kubectl(
        "patch", "finetunejob", job, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def get_md(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = kubectl_json(cluster, "get", "modeldeployment", name, "-n", namespace)
    return body


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def children(cluster: Cluster, namespace: str, name: str) -> set[tuple[str, str]]:
    listing = kubectl_json(cluster, "get", SERVED_KINDS, "-n", namespace, "-l", f"{LABEL}={name}")
    return {(item["kind"], item["metadata"]["name"]) for item in listing["items"]}


def test_from_a_succeeded_finetunejob_children_status_new_revision_and_deletion(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.apply(modeldeployment("bot", model={"fromFineTuneJob": "src"}, replicas=2), namespace)

    def waiting() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "bot")
        return body if condition(body, "ModelReady").get("reason") == "WaitingForFineTuneJob" else None

    body = wait_for(waiting, 120, "ModelReady=False WaitingForFineTuneJob")
    assert "does not exist" in condition(body, "ModelReady")["message"]
    assert condition(body, "Ready")["status"] == "False"
    assert not children(cluster, namespace, "bot"), "nothing is deployed before the model exists"

    cluster.apply(finetunejob("src"), namespace)
    # The job's checkpoint claim (its child) holds the artifact; a Succeeded job always has it.
    wait_for(
        lambda: (
            cluster.kubectl("get", "pvc", "src-checkpoints", "-n", namespace, check=False).returncode == 0
        ),
        120,
        "the FineTuneJob's checkpoint claim",
    )
    # Succeeded without an artifact (its trainer's last status report lost): the deployment says so.
    succeed(cluster, namespace, "src", None)

    def no_artifact() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "bot")
        return body if condition(body, "ModelReady").get("reason") == "FineTuneJobHasNoArtifact" else None

    body = wait_for(no_artifact, 60, "ModelReady=False FineTuneJobHasNoArtifact")
    assert "status.artifact.uri is empty" in condition(body, "ModelReady")["message"]
    assert not children(cluster, namespace, "bot")
    succeed(cluster, namespace, "src", "pvc://src-checkpoints/output/final/model")

    def deployed() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "bot")
        status = body.get("status") or {}
        return (
            body
            if (status.get("model") or {}).get("fineTuneJob") == "src" and status.get("readyReplicas") == 2
            else None
        )

    body = wait_for(deployed, 180, "the deployment's 2 replicas ready")
    status = body["status"]
    assert status["model"]["uri"] == "pvc://src-checkpoints/output/final/model"
    assert status["endpoint"] == f"http://bot.{namespace}.svc/v1"
    assert status["apiKeySecret"] == "bot-api-keys"
    assert status["observedGeneration"] == body["metadata"]["generation"]
    revision = status["rollout"]["stableRevision"]
    assert condition(body, "Available")["status"] == "True"
    # kwok's pods pass "their probe" but answer no HTTP: ready by the probe alone, no measured figures.
    cluster.kubectl("wait", "--for=condition=Ready", "modeldeployment/bot", "-n", namespace, "--timeout=120s")
    body = get_md(cluster, namespace, "bot")
    model_ready = condition(body, "ModelReady")
    assert (model_ready["status"], model_ready["reason"]) == ("True", "ServerReady")
    assert "quantization" not in body["status"]
    assert condition(body, "Progressing")["reason"] == "RolloutComplete"
    kinds = children(cluster, namespace, "bot")
    assert {
        ("Deployment", "bot"),
        ("Service", "bot"),
        ("ConfigMap", f"bot-server-{revision}"),
        ("Secret", "bot-api-keys"),
        ("PodDisruptionBudget", "bot"),
        ("NetworkPolicy", "bot"),
    } <= kinds
    deployment = kubectl_json(cluster, "get", "deployment", "bot", "-n", namespace)
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["finetune.dev/revision"] == revision
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "src-checkpoints"
    secret = kubectl_json(cluster, "get", "secret", "bot-api-keys", "-n", namespace)
    assert secret["data"]["api-keys"], "a generated key"

    # A spec change the pods see is a new revision, rolled out by the Deployment (RollingUpdate).
    cluster.kubectl(
        "patch", "modeldeployment", "bot", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runtime":{"maxNewTokens":64}}}',
    )  # fmt: skip

    def rolled() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "bot")
        rollout = (body.get("status") or {}).get("rollout") or {}
        return body if rollout.get("stableRevision") not in (None, revision) else None

    body = wait_for(rolled, 180, "a new stable revision")
    new_revision = body["status"]["rollout"]["stableRevision"]
    assert {r["name"] for r in body["status"]["revisions"]} >= {revision, new_revision}

    def old_config_gone() -> bool:
        kinds = children(cluster, namespace, "bot")
        return ("ConfigMap", f"bot-server-{revision}") not in kinds and (
            "ConfigMap",
            f"bot-server-{new_revision}",
        ) in kinds

    wait_for(old_config_gone, 180, "the old revision's config to go")

    cluster.kubectl("delete", "modeldeployment", "bot", "-n", namespace, "--timeout=60s")
    wait_for(lambda: not children(cluster, namespace, "bot"), 180, "every child to be garbage-collected")


def test_a_canary_without_evidence_is_inconclusive_then_rolled_back(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    canary = {
        "strategy": "Canary",
        "canary": {
            "steps": [{"weight": 50, "pauseSeconds": 0}],
            "analysis": {"intervalSeconds": 2, "minRequests": 5, "inconclusiveTimeoutSeconds": 8},
        },
    }
    spec = {
        "model": {"uri": "file:///models/tiny", "task": "causal-lm"},
        "rollout": canary,
        "auth": {"enabled": False},
    }
    cluster.apply(modeldeployment("cny", **spec), namespace)

    def stable_ready() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "cny")
        return body if (body.get("status") or {}).get("readyReplicas") == 1 else None

    first = wait_for(stable_ready, 180, "the first revision's replica")["status"]["rollout"]["stableRevision"]
    cluster.kubectl(
        "patch", "modeldeployment", "cny", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runtime":{"maxNewTokens":32}}}',
    )  # fmt: skip

    def history(decision: str) -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "cny")
        entries = ((body.get("status") or {}).get("rollout") or {}).get("history") or []
        return body if any(e["decision"] == decision for e in entries) else None

    body = wait_for(lambda: history("Started"), 120, "the canary to start")
    assert ("Deployment", "cny-canary") in children(cluster, namespace, "cny")
    assert condition(body, "Progressing")["status"] == "True"
    body = wait_for(lambda: history("RolledBack"), 180, "the inconclusive canary to be rolled back")
    rollout = body["status"]["rollout"]
    decisions = [e["decision"] for e in rollout["history"]]
    assert "Waiting" in decisions, "inconclusive first: it waits before it fails"
    assert not {"Promoted", "Completed"} & set(decisions), "too little evidence never passes"
    rolled_back = next(e for e in rollout["history"] if e["decision"] == "RolledBack")
    assert rolled_back["reason"] == "AnalysisInconclusiveTimeout"
    assert rollout["stableRevision"] == first
    assert rollout["failedRevision"] != first
    wait_for(
        lambda: ("Deployment", "cny-canary") not in children(cluster, namespace, "cny"),
        60,
        "the canary to go",
    )
    body = get_md(cluster, namespace, "cny")
    assert (condition(body, "Degraded")["status"], condition(body, "Degraded")["reason"]) == (
        "True",
        "RolledBack",
    )
    events = kubectl_json(
        cluster, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=cny"
    )
    reasons = {e["reason"] for e in events["items"]}
    assert {"CanaryStarted", "AnalysisInconclusiveTimeout"} <= reasons
    deployment = kubectl_json(cluster, "get", "deployment", "cny", "-n", namespace)
    assert deployment["metadata"]["labels"]["finetune.dev/revision"] == first, "the stable was never touched"


def gateway_api_crd() -> Path:
    """The Gateway API's HTTPRoute CRD (standard channel) at the version Kueue's module graph pins
    (hack/tools/kueue/go.mod), from the Go module cache (downloaded from the module proxy on first use).
    Fails, never skips, when it can't be had."""
    tools = REPO_ROOT / "hack" / "tools" / "kueue"
    subprocess.run(["go", "mod", "download", "sigs.k8s.io/gateway-api"], cwd=tools, check=True, timeout=300)
    found = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/gateway-api"],
        cwd=tools, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    path = Path(found.stdout.strip()) / "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"
    assert path.is_file(), f"no HTTPRoute CRD at {path}"
    return path


def test_with_the_gateway_api_a_canary_is_split_by_exact_httproute_weights(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    crd = gateway_api_crd()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    try:
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/httproutes.gateway.networking.k8s.io", "--timeout=60s"
        )
        _canary_through_a_route(cluster, namespace)
    finally:
        # The Gateway API stays this test's: later tests see a cluster without it.
        cluster.kubectl("delete", "modeldeployment", "routed", "-n", namespace, "--ignore-not-found")
        cluster.kubectl("delete", "-f", str(crd), "--ignore-not-found", "--timeout=60s", check=False)


def _canary_through_a_route(cluster: Cluster, namespace: str) -> None:
    canary = {
        "strategy": "Canary",
        "canary": {
            "steps": [{"weight": 20, "pauseSeconds": 3600}],
            "analysis": {"intervalSeconds": 5, "inconclusiveTimeoutSeconds": 3600},
            "gatewayRef": {"name": "inference", "namespace": "gateways"},
        },
    }
    spec = {"model": {"uri": "file:///models/tiny", "task": "causal-lm"}, "rollout": canary}
    cluster.apply(modeldeployment("routed", **spec), namespace)

    def stable_ready() -> dict[str, Any] | None:
        body = get_md(cluster, namespace, "routed")
        return body if (body.get("status") or {}).get("readyReplicas") == 1 else None

    wait_for(stable_ready, 180, "the first revision's replica")
    cluster.kubectl(
        "patch", "modeldeployment", "routed", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runtime":{"maxNewTokens":32}}}',
    )  # fmt: skip

    def routed() -> dict[str, Any] | None:
        found = cluster.kubectl("get", "httproute", "routed", "-n", namespace, "-o", "json", check=False)
        if found.returncode != 0:
            return None
        route: dict[str, Any] = json.loads(found.stdout)
        weights = [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]]
        return route if weights == [80, 20] else None

    route = wait_for(routed, 180, "the HTTPRoute to send 20 % to the canary")
    assert [b["name"] for b in route["spec"]["rules"][0]["backendRefs"]] == ["routed-stable", "routed-canary"]
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "inference",
            "namespace": "gateways",
        }
    ]
    kinds = children(cluster, namespace, "routed")
    assert {
        ("Service", "routed-stable"),
        ("Service", "routed-canary"),
        ("Deployment", "routed-canary"),
    } <= kinds
    body = get_md(cluster, namespace, "routed")
    assert body["status"]["rollout"]["weight"] == 20, "exact, not the replica proportion (50 % with 1 + 1)"
