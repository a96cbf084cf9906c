"""`spec.output.uri` for real. `pvc://claim/path`: the operator mounts the user's claim in the trainer pod,
the pod's container (the trainer, run by the local node's agent with the pod's volumes and environment)
copies the outputs onto it. `s3://bucket/prefix`: the trainer copies to a real S3-compatible server with
the credentials and endpoint of `spec.credentialsSecret`, its only source of them. Either way
status.artifact points at the copy while `claimUri` keeps the export on the checkpoint claim."""

from __future__ import annotations

import json

import pytest
from hack.make_tiny_model import TinyAssets

from finetune_trainer.output_copy import MARKER
from tests.e2e.test_lifecycle import (
    claim_dir,
    ended_pod,
    exit_code,
    finetunejob,
    running_trainer_pod,
    tiny,
    trainer_log,
    wait_condition,
)
from tests.kube_helpers import Cluster, LocalNode, OperatorProcess, http_ok, kubectl_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("local_node")]

__all__ = ["tiny"]  # fixture shared with test_lifecycle
MOTO_PORT = 5000


@pytest.fixture
def s3_service(cluster: Cluster, namespace: str, local_node: LocalNode) -> tuple[str, str]:
    """A real S3-compatible server (moto's) as a pod on the local node behind a Service: (its address for
    pods, by cluster IP; its address for this machine, the Service's loopback forwarder)."""
    server = {
        "name": "moto",
        "image": "motoserver/moto",
        "command": ["python", "-m", "moto.server", "-H", "0.0.0.0", "-p", str(MOTO_PORT)],
        "ports": [{"name": "s3", "containerPort": MOTO_PORT}],
        "readinessProbe": {"httpGet": {"path": "/moto-api/", "port": "s3"}, "periodSeconds": 1},
    }
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "s3", "labels": {"app": "s3"}},
                "spec": {**LocalNode.placement(), "containers": [server]},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s3"},
                "spec": {"selector": {"app": "s3"}, "ports": [{"name": "s3", "port": MOTO_PORT}]},
            },
        ],
        namespace,
    )
    ip = kubectl_json(cluster, "get", "service", "s3", "-n", namespace)["spec"]["clusterIP"]
    cluster.kubectl("wait", "--for=condition=Ready", "pod/s3", "-n", namespace, "--timeout=120s")
    local = local_node.service_address(namespace, "s3", "s3")
    wait_for(lambda: http_ok(f"{local}/moto-api/"), 60, "moto through the Service forwarder")
    return f"http://{ip}:{MOTO_PORT}", local


def test_outputs_are_copied_onto_the_users_claim_and_the_artifact_points_there(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tiny: TinyAssets
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

    ended = ended_pod(cluster, namespace, pod["metadata"]["name"])
    assert exit_code(ended) == 0, trainer_log(cluster, namespace, pod["metadata"]["name"])

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
    s3_service: tuple[str, str],
) -> None:
    import base64

    import boto3

    in_cluster, here = s3_service
    variables = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=here,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="models")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials"},
        "data": {
            k: base64.b64encode(v.encode()).decode()
            for k, v in {**variables, "AWS_ENDPOINT_URL": in_cluster}.items()
        },
    }
    job = finetunejob("to-s3", tiny.model_dir, tiny.data_path, max_steps=10)
    job["spec"]["output"] = {"uri": "s3://models/support-bot/v2"}
    job["spec"]["credentialsSecret"] = "s3-credentials"
    cluster.apply([secret, job], namespace)
    wait_condition(cluster, namespace, "to-s3", "Admitted")
    pod = running_trainer_pod(cluster, namespace, "to-s3")
    assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]

    ended = ended_pod(cluster, namespace, pod["metadata"]["name"])
    assert exit_code(ended) == 0, trainer_log(cluster, namespace, pod["metadata"]["name"])

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
