"""Admission webhooks served by the operator against the dev cluster's real kube-apiserver: refusals with
the field named, the requesting user recorded, fail-closed creates and open deletes while the operator is
down, RBAC refusals (impersonation) never audited as allowed, and an audit file that verifies."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hack import devcluster

from tests.cluster.test_finetunejob import ftj, get_ftj, gpu_pool_free, trainer_pods, wait_phase
from tests.kube_helpers import REPO_ROOT, Cluster, OperatorProcess, finish_pod, kubectl_json, wait_for
from tests.operator_role import OperatorRole

pytestmark = pytest.mark.cluster

CREATED_BY = "finetune.dev/created-by"


def audit_records(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


@pytest.fixture
def webhook_operator(
    cluster: Cluster, crds: list[str], namespace: str, operator_role: OperatorRole, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, Path]]:
    audit_dir = tmp_path / "audit"
    name = operator_role.name  # the chart's fullname: the ClusterRole may write only these configurations
    env = {
        "FTO_WEBHOOK_PORT": str(devcluster.free_port()),
        "FTO_WEBHOOK_CONFIGURATION_NAME": name,
        "FTO_WEBHOOK_CERT_DIR": str(tmp_path / "certs"),
        "FTO_WEBHOOK_ALLOWED_MODEL_SCHEMES": "hf,pvc,file",
        "FTO_WEBHOOK_ALLOWED_DATA_SCHEMES": "pvc,file",
        "FTO_AUDIT_DIR": str(audit_dir),
        "FTO_AUDIT_CHECKPOINT_EVERY": "10",
    }
    proc = OperatorProcess(namespace, operator_role.kubeconfig(), tmp_path / "operator.log", env=env)
    try:
        proc.start()
        wait_for(
            lambda: (
                cluster.kubectl("get", "validatingwebhookconfiguration", name, check=False).returncode == 0
            ),
            30,
            "the webhook configurations",
        )
        yield proc, audit_dir
    finally:
        if not proc.running:
            proc.start()
        cluster.kubectl(
            "delete", "finetunejobs,modeldeployments", "--all", "-n", namespace, "--timeout=60s", check=False
        )
        proc.stop()
        for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
            cluster.kubectl("delete", kind, name, "--ignore-not-found")
        print(f"----- operator log -----\n{proc.logs()[-20000:]}")


def create(
    cluster: Cluster, namespace: str, body: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("create", "-n", namespace, *extra, "-f", "-", input=json.dumps(body), check=False)


def with_spec(body: dict[str, Any], **spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["spec"].update(spec)
    return out


def mdep(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"fromFineTuneJob": "good"}, "auth": {"enabled": False}, **spec},
    }


def invalid_cases(namespace: str) -> list[tuple[dict[str, Any], str, str]]:
    """(body, field, text): bodies the CRD schema and CEL accept, refused only by the webhook."""
    job = ftj("bad", gpus=1)
    dataset = job["spec"]["dataset"]
    return [
        (
            with_spec(job, credentialsSecret="no-such-secret"),
            "spec.credentialsSecret",
            "Secret 'no-such-secret' not found",
        ),
        (
            with_spec(job, dataset={**dataset, "source": "pvc://no-such-claim/train.jsonl"}),
            "spec.dataset.source",
            "PersistentVolumeClaim 'no-such-claim' not found",
        ),
        (
            with_spec(job, checkpointing={"storage": {"existingClaim": "no-ckpt"}}),
            "spec.checkpointing.storage.existingClaim",
            "PersistentVolumeClaim 'no-ckpt' not found",
        ),
        (
            with_spec(job, distributed={"gpusPerNode": 16}),
            "spec.distributed.gpusPerNode",
            "16 GPUs per pod, but the largest node offering nvidia.com/gpu of product "
            "NVIDIA-H100-80GB-HBM3 has 8",
        ),
        (
            with_spec(job, resources={"gpuProduct": "NVIDIA-B200"}),
            "spec.distributed.gpusPerNode",
            "no node offers nvidia.com/gpu of product NVIDIA-B200",
        ),
        (
            with_spec(job, model={"source": "s3://models/tiny"}),
            "spec.model.source",
            "scheme s3:// is not allowed",
        ),
        (
            with_spec(job, dataset={**dataset, "source": "hf://datasets/tiny"}),
            "spec.dataset.source",
            "scheme hf:// is not allowed",
        ),
        (with_spec(job, output={"uri": "s3://bucket/out"}), "spec.output.uri", "scheme s3:// is not allowed"),
        (
            with_spec(job, output={"uri": "pvc://bad-checkpoints/output/model/copy"}),
            "spec",
            "the trainer would refuse its config",
        ),
        (
            mdep("bad-mdep", model={"fromFineTuneJob": "no-such-job"}),
            "spec.model.fromFineTuneJob",
            "not found",
        ),
        (
            mdep("bad-mdep", auth={"apiKeySecretRef": {"name": "keys", "key": "missing"}}),
            "spec.auth.apiKeySecretRef.key",
            "has no key 'missing'",
        ),
        (
            mdep("bad-mdep", resources={"gpus": 12}),
            "spec.resources.gpus",
            "12 GPUs per pod, but the largest node offering nvidia.com/gpu has 8",
        ),
        # What the server would refuse in the config the operator renders (CRD and CEL accept these).
        (
            mdep("bad-mdep", model={"uri": "hf://org/model", "task": "causal-lm"}),
            "spec.model.uri",
            "the server would refuse this: the builtin runtime serves a model folder (pvc:// or file://)",
        ),
        (
            mdep("bad-mdep", model={"uri": "file:///models/a", "task": "causal-lm", "baseModel": "hf://o/b"}),
            "spec.model.baseModel",
            "the server would refuse this: the builtin runtime serves a model folder (pvc:// or file://), "
            "not hf://",
        ),
        (
            mdep(
                "bad-mdep",
                model={
                    "uri": "file:///models/a",
                    "task": "causal-lm",
                    "encryptionKeySecretRef": {"name": "keys", "key": "aes"},
                },
            ),
            "spec.model.encryptionKeySecretRef.key",
            "Secret 'keys' has no key 'aes'",
        ),
    ]


def test_webhooks_refuse_record_and_fail_closed(
    cluster: Cluster, namespace: str, webhook_operator: tuple[OperatorProcess, Path]
) -> None:
    proc, audit_dir = webhook_operator
    me = cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout.strip()
    cluster.kubectl(
        "create", "secret", "generic", "keys", "-n", namespace, "--from-literal=api-keys=k3y-v4lue-c0ffee"
    )

    # A valid job passes, with the requesting user recorded (whatever the request itself claimed).
    good = ftj("good", gpus=1)
    good["metadata"]["annotations"] = {CREATED_BY: "someone-else"}
    good["spec"]["credentialsSecret"] = "keys"  # its value is a marker that must never be copied
    done = create(cluster, namespace, good)
    assert done.returncode == 0, done.stderr
    stored = get_ftj(cluster, namespace, "good")
    assert stored["metadata"]["annotations"][CREATED_BY] == me
    # Cluster-state defaults: the dev cluster's default StorageClass is written down; no Kueue, no queue.
    default_class = next(
        sc["metadata"]["name"]
        for sc in kubectl_json(cluster, "get", "storageclass")["items"]
        if sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    )
    assert stored["spec"]["checkpointing"]["storage"]["storageClassName"] == default_class
    assert stored["metadata"]["annotations"]["finetune.dev/defaulted"] == (
        f"spec.checkpointing.storage.storageClassName={default_class}"
    )
    assert "queueName" not in stored["spec"].get("scheduling", {})

    # Each invalid case is refused with its field and message.
    for body, field, text in invalid_cases(namespace):
        done = create(cluster, namespace, body)
        assert done.returncode != 0, f"{field} was not refused"
        assert "denied the request" in done.stderr, done.stderr
        assert f"{field}: " in done.stderr, done.stderr
        assert text in done.stderr, done.stderr

    # Updates: created-by can't change; fields frozen while the job runs.
    annotate = cluster.kubectl(
        "annotate",
        "--overwrite",
        "finetunejob",
        "good",
        "-n",
        namespace,
        f"{CREATED_BY}=mallory",
        check=False,
    )
    assert annotate.returncode != 0
    assert f"metadata.annotations[{CREATED_BY}]" in annotate.stderr
    wait_phase(cluster, namespace, "good", "Running")
    claim = kubectl_json(cluster, "get", "pvc", "good-checkpoints", "-n", namespace)
    assert claim["spec"]["storageClassName"] == default_class
    patch = cluster.kubectl(
        "patch", "finetunejob", "good", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"distributed": {"gpusPerNode": 2}}}), check=False,
    )  # fmt: skip
    assert patch.returncode != 0
    assert "spec.distributed: can't change while the job is Running: suspend it first" in patch.stderr

    # Secrets by reference only: the marker is in no ConfigMap, status or Event (plain or base64).
    marker = "k3y-v4lue-c0ffee"
    seen = "".join(
        cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout
        for kind in ("configmaps", "finetunejobs", "events", "jobs")
    )
    assert marker not in seen
    assert base64.b64encode(marker.encode()).decode() not in seen

    # A user without rights is refused by RBAC (403) before admission: never audited as allowed.
    forbidden = create(cluster, namespace, ftj("intruder", gpus=1), "--as=mallory")
    assert forbidden.returncode != 0
    assert "Forbidden" in forbidden.stderr or "forbidden" in forbidden.stderr

    # The webhook down: creates of our kinds are refused (fail closed), deletes go through.
    proc.stop()
    down = create(cluster, namespace, ftj("while-down", gpus=1))
    assert down.returncode != 0
    assert "failed calling webhook" in down.stderr, down.stderr
    cluster.kubectl("create", "configmap", "unaffected", "-n", namespace)  # other kinds are untouched
    deleted = cluster.kubectl("delete", "finetunejob", "good", "-n", namespace, "--wait=false", check=False)
    assert deleted.returncode == 0, deleted.stderr
    assert get_ftj(cluster, namespace, "good")["metadata"].get("deletionTimestamp")
    proc.start()
    wait_for(
        lambda: cluster.kubectl("get", "finetunejob", "good", "-n", namespace, check=False).returncode != 0,
        90,
        "the deleted job to go once the operator is back",
    )
    proc.stop()  # flushes a final checkpoint

    records = audit_records(audit_dir)
    admissions = [r for r in records if r["type"] == "admission"]
    denied = [r for r in admissions if r["allowed"] is False]
    assert len(denied) >= len(invalid_cases(namespace)) + 2
    assert all(r["reason"] for r in denied)
    created = next(r for r in admissions if r["verb"] == "CREATE" and r["name"] == "good")
    assert created["allowed"] is True
    assert created["user"] == me
    assert created["specDigest"].startswith("sha256:")
    assert created["correlationId"] == f"FineTuneJob/{namespace}/good@1"
    actions = [r for r in records if r["type"] == "action" and r["name"] == "good"]
    # The operator saw it go (its own record, after the unrecorded DELETE below), for the deleting generation.
    gone = [r for r in actions if r["verb"] == "Deleted"]
    assert len(gone) == 1, actions
    actions = [r for r in actions if r["verb"] != "Deleted"]
    assert "ChildrenApplied" in {r["verb"] for r in actions}, actions
    assert len({r["verb"] for r in actions}) >= 3, actions  # condition transitions (admitted, running...)
    assert all(r["correlationId"] == created["correlationId"] for r in actions)  # one generation
    assert not [r for r in records if r["user"] == "mallory" or r["name"] == "intruder"]
    assert not [r for r in records if r["name"] == "while-down"]  # the webhook never saw it
    # The delete that went through while the webhook was down is not recorded (failurePolicy Ignore);
    # no Secret value reaches the log.
    assert marker not in "".join(p.read_text() for p in audit_dir.glob("*.jsonl"))
    assert marker not in proc.logs()

    cli = [sys.executable, "-m", "finetune_operator", "audit"]
    env = {"PYTHONPATH": str(REPO_ROOT / "operator")}
    verify = subprocess.run(
        [*cli, "verify", str(audit_dir)], capture_output=True, text=True, env=env, check=False
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith(f"OK: {len(records)} records")
    query = subprocess.run(
        [*cli, "query", str(audit_dir), "--resource", f"{namespace}/good", "-o", "jsonl"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert query.returncode == 0
    assert {json.loads(line)["verb"] for line in query.stdout.splitlines()} >= {"CREATE", "UPDATE"}
    # Editing one record is named.
    (path,) = sorted(audit_dir.glob("audit-*.jsonl"))[:1]
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"user":"', '"user":"x', 1)
    path.write_text("\n".join(lines) + "\n")
    verify = subprocess.run(
        [*cli, "verify", str(audit_dir)], capture_output=True, text=True, env=env, check=False
    )
    assert verify.returncode == 1
    assert f"{path}:3: edited" in verify.stdout

    # Every kind's stdout records (the operator's log mixes them with log lines) verify too.
    stdin = subprocess.run(
        [*cli, "verify", "-"], input=proc.logs(), capture_output=True, text=True, env=env, check=False
    )
    assert stdin.returncode == 0, stdin.stdout
    kubectl_json(cluster, "get", "configmap", "unaffected", "-n", namespace)


def test_failing_audit_file_sink_is_a_condition_and_a_metric_and_recovers(
    cluster: Cluster, crds: list[str], namespace: str, operator_role: OperatorRole, tmp_path: Path
) -> None:
    """The audit directory can't be created (a file is in the way): reconciling goes on, the objects and
    the metrics say so, stdout keeps every record; once the path is free the backlog is written."""
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    env = {"FTO_AUDIT_DIR": str(blocker / "audit"), "FTO_AUDIT_RETRY_SECONDS": "1"}
    proc = OperatorProcess(namespace, operator_role.kubeconfig(), tmp_path / "operator.log", env=env)
    proc.start()
    try:
        cluster.apply(ftj("parked", suspend=True), namespace)

        def audit_condition() -> dict[str, Any] | None:
            conditions = (get_ftj(cluster, namespace, "parked").get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c["type"] == "AuditLogHealthy"), None)

        failing = wait_for(audit_condition, 60, "the AuditLogHealthy condition")
        assert failing["status"] == "False"
        assert failing["reason"] == "SinkFailing"
        assert "file sink failing" in failing["message"]
        metrics = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
        assert 'finetune_operator_audit_sink_up{sink="file"} 0.0' in metrics

        blocker.unlink()
        wait_for(lambda: list((blocker / "audit").glob("audit-*.jsonl")), 30, "the backlog written")
        cluster.apply(with_spec(ftj("parked", suspend=True), scheduling={"suspend": False}), namespace)
        wait_for(lambda: (audit_condition() or {}).get("status") == "True", 60, "AuditLogHealthy True again")
    finally:
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", namespace, "--timeout=60s", check=False)
        proc.stop()
    cli = [sys.executable, "-m", "finetune_operator", "audit", "verify"]
    env = {"PYTHONPATH": str(REPO_ROOT / "operator")}
    on_file = subprocess.run(
        [*cli, str(blocker / "audit")], capture_output=True, text=True, env=env, check=False
    )
    on_stdout = subprocess.run(
        [*cli, "-"], input=proc.logs(), capture_output=True, text=True, env=env, check=False
    )
    assert on_file.returncode == 0, on_file.stdout
    assert on_stdout.returncode == 0, on_stdout.stdout
    count = on_stdout.stdout.split()[1]
    assert on_file.stdout.startswith(f"OK: {count} records"), (on_file.stdout, on_stdout.stdout)


def test_trainer_pods_run_in_a_restricted_pod_security_namespace(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    gpu_pool_free(cluster)
    cluster.apply(ftj("restricted", gpus=1), namespace)
    wait_phase(cluster, namespace, "restricted", "Running")
    (pod,) = trainer_pods(cluster, namespace, "restricted", 1)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    finish_pod(cluster, namespace, pod["metadata"]["name"], 0)
    wait_phase(cluster, namespace, "restricted", "Succeeded")


def test_server_pods_of_both_runtimes_run_in_a_restricted_pod_security_namespace(
    cluster: Cluster, namespace: str, operator: Any
) -> None:
    """Pod Security Admission checks the pods the Deployments' ReplicaSets create; a refusal shows only as
    a FailedCreate event, so the test asserts the pods exist and fails early with that event's message."""
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    model = {"uri": "file:///models/tiny", "task": "causal-lm"}
    runtimes = {
        "builtin": {"model": model, "resources": {"cpu": "100m", "memory": "128Mi"}},
        # A GPU product no node has: the pod is created (and checked) but stays Pending, so it holds none
        # of the fake GPUs other tests on the shared cluster count.
        "vllm": {
            "model": model,
            "runtime": {"type": "vllm"},
            "quantization": {"method": "none"},
            "resources": {"gpus": 1, "gpuProduct": "fto-test-no-such-gpu"},
        },
    }
    for name, spec in runtimes.items():
        body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name}}
        cluster.apply({**body, "spec": spec}, namespace)

    def created(name: str) -> list[dict[str, Any]] | None:
        pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", f"finetune.dev/deployment={name}")
        if pods["items"]:
            return list(pods["items"])
        events = kubectl_json(
            cluster, "get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate"
        )
        refusals = [e["message"] for e in events["items"] if e["involvedObject"]["name"].startswith(name)]
        assert not refusals, refusals
        return None

    for name in runtimes:
        (pod, *_) = wait_for(lambda name=name: created(name), 120, f"the {name} server's pods")
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    cluster.kubectl("delete", "modeldeployments", "--all", "-n", namespace, "--timeout=60s")
