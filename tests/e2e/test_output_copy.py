"""`spec.output.uri` for real. `pvc://claim/path`: the operator mounts the user's claim in the trainer pod,
the pod's container (the trainer, run by hack/pod_runner.py with the pod's volumes and environment) copies the
outputs onto it. `s3://bucket/prefix`: the trainer copies to a real S3-compatible server with the credentials
and endpoint of `spec.credentialsSecret`, its only source of them. Either way status.artifact points at the
copy while `claimUri` keeps the export on the checkpoint claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hack import pod_runner
from hack.make_tiny_model import TinyAssets

from finetune_trainer.output_copy import MARKER
from tests.e2e.test_lifecycle import (
    claim_dir,
    finetunejob,
    running_trainer_pod,
    tiny,
    wait_condition,
)
from tests.kube_helpers import Cluster, OperatorProcess
from tests.s3_server import s3_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(pod_runner.cannot_run_pods() is not None, reason=str(pod_runner.cannot_run_pods())),
]

__all__ = ["s3_server", "tiny"]  # fixtures: tiny is shared with test_lifecycle


def test_outputs_are_copied_onto_the_users_claim_and_the_artifact_points_there(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tiny: TinyAssets, tmp_path: Path
) -> None:
    store = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "model-store"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    job = finetunejob("copied", tiny.model_dir, tiny.data_path, max_steps=10)
    job["spec"]["output"] = {"uri": "pvc://model-store/support-bot/v1"}
    cluster.apply([store, job], namespace)
    wait_condition(cluster, namespace, "copied", "Admitted")
    pod = running_trainer_pod(cluster, namespace, "copied")
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/mnt/output"]["name"]]["persistentVolumeClaim"]["claimName"] == "model-store"

    kube = pod_runner.Kube(kubectl=cluster.kubectl_path, kubeconfig=cluster.kubeconfig)
    run = pod_runner.run_pod(kube, namespace, pod["metadata"]["name"], log_path=tmp_path / "trainer.log")
    assert run.exit_code == 0, run.log()

    status = wait_condition(cluster, namespace, "copied", "Succeeded")["status"]
    artifact = status["artifact"]
    assert artifact["uri"] == "pvc://model-store/support-bot/v1/model", artifact
    assert artifact["modelCard"] == "pvc://model-store/support-bot/v1/README.md", artifact
    assert artifact["claimUri"] == "pvc://copied-checkpoints/output/model/model", artifact

    copy, export = (
        claim_dir(cluster, namespace, artifact["uri"]),
        claim_dir(cluster, namespace, artifact["claimUri"]),
    )
    marker = json.loads((copy.parent / MARKER).read_text())
    assert marker["artifact"]["sha256"] == artifact["sha256"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (copy / name).read_bytes() == (export / name).read_bytes(), name
    assert (copy.parent / "README.md").read_text() == (export.parent / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(copy)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_outputs_are_copied_to_s3_with_the_credentials_secret(
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    tiny: TinyAssets,
    tmp_path: Path,
    s3_server: str,
) -> None:
    import base64
    import os

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="models")
    variables = {
        k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials"},
        "data": {
            k: base64.b64encode(v.encode()).decode()
            for k, v in {**variables, "AWS_ENDPOINT_URL": s3_server}.items()
        },
    }
    job = finetunejob("to-s3", tiny.model_dir, tiny.data_path, max_steps=10)
    job["spec"]["output"] = {"uri": "s3://models/support-bot/v2"}
    job["spec"]["credentialsSecret"] = "s3-credentials"
    cluster.apply([secret, job], namespace)
    wait_condition(cluster, namespace, "to-s3", "Admitted")
    pod = running_trainer_pod(cluster, namespace, "to-s3")
    assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]

    kube = pod_runner.Kube(kubectl=cluster.kubectl_path, kubeconfig=cluster.kubeconfig)
    run = pod_runner.run_pod(kube, namespace, pod["metadata"]["name"], log_path=tmp_path / "trainer.log")
    assert run.exit_code == 0, run.log()
    assert run.env["AWS_ENDPOINT_URL"] == s3_server  # from the Secret: the pod has no other source

    artifact = wait_condition(cluster, namespace, "to-s3", "Succeeded")["status"]["artifact"]
    assert artifact["uri"] == "s3://models/support-bot/v2/model", artifact
    assert artifact["modelCard"] == "s3://models/support-bot/v2/README.md", artifact
    assert artifact["claimUri"] == "pvc://to-s3-checkpoints/output/model/model", artifact
    export = claim_dir(cluster, namespace, artifact["claimUri"])
    for name in ("config.json", "model.safetensors"):
        body = s3.get_object(Bucket="models", Key=f"support-bot/v2/model/{name}")["Body"].read()
        assert body == (export / name).read_bytes(), name
    marker = json.loads(s3.get_object(Bucket="models", Key=f"support-bot/v2/{MARKER}")["Body"].read())
    assert marker["artifact"]["sha256"] == artifact["sha256"]
