"""Status reporting against the dev cluster with a ServiceAccount token that may only patch its own job."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer.env import STATUS_KUBECONFIG_ENV
from finetune_trainer.reporting import FIELD_MANAGER, GROUP, PLURAL, VERSION, StatusPatcher, _api_client
from trainer_fixtures import make_config, make_task_data, make_tiny_model, run_trainer, write_config

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "model": {"source": "file:///models/tiny"},
            "dataset": {"source": "file:///data/train.jsonl"},
            "method": "lora",
        },
    }


def _trainer_kubeconfig(cluster: Any, namespace: str, job: str, tmp: Path) -> Path:
    """A ServiceAccount + Role allowing get/patch on this job's status only; a kubeconfig with its token."""
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "trainer-status", "namespace": namespace},
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [job],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "trainer-status", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer-status"},
        "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": namespace}],
    }
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, binding]})
    )
    token = cluster.kubectl("create", "token", "trainer", "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    if "certificate-authority" in server:
        ca = base64.b64encode(Path(server.pop("certificate-authority")).read_bytes()).decode()
        server["certificate-authority-data"] = ca
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dev", "cluster": server}],
        "users": [{"name": "trainer", "user": {"token": token}}],
        "contexts": [
            {"name": "trainer", "context": {"cluster": "dev", "user": "trainer", "namespace": namespace}}
        ],
        "current-context": "trainer",
    }
    path = tmp / "trainer.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_trainer_patches_its_own_job_status_and_nothing_else(
    cluster: Any, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    cluster.apply([_job("mine"), _job("other")], namespace=namespace)
    kubeconfig = _trainer_kubeconfig(cluster, namespace, "mine", tmp_path)

    model_dir = make_tiny_model(tmp_path / "model")
    data = make_task_data(tmp_path / "data.jsonl")
    config = make_config(
        tmp_path,
        model_dir,
        data,
        reporting={"jobName": "mine", "namespace": namespace, "metricsPort": 0, "statusThrottleSeconds": 0.5},
        output={"uri": "pvc://mine-checkpoints/output/model"},
    )
    result = run_trainer(write_config(tmp_path, config), **{STATUS_KUBECONFIG_ENV: str(kubeconfig)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "status patch" not in result.stderr  # no failed patches logged

    job = json.loads(
        cluster.kubectl("get", "ftj", "mine", "-n", namespace, "-o", "json", "--show-managed-fields").stdout
    )
    status = job["status"]
    # Who wrote progress/metrics/artifact is visible: the trainer's own field manager.
    writers = {
        entry["manager"]: set(entry.get("fieldsV1", {}).get("f:status", {}))
        for entry in job["metadata"]["managedFields"]
        if entry.get("subresource") == "status"
    }
    assert {"f:progress", "f:metrics", "f:artifact"} <= writers.get(FIELD_MANAGER, set()), writers
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    print("status.progress:", status["progress"])
    assert status["progress"]["step"] == metrics["steps"]
    assert status["progress"]["totalSteps"] == metrics["totalSteps"]
    assert status["progress"]["percent"] == 100.0
    assert status["metrics"]["trainLoss"] > 0
    assert status["metrics"]["bestStep"] == metrics["bestStep"]
    assert status["metrics"]["before"]["loss"] == pytest.approx(metrics["before"]["validation"]["loss"])
    assert status["checkpoints"]["latestStep"] == metrics["steps"]
    assert status["artifact"]["sha256"] == metrics["artifact"]["sha256"]
    # The last report says the run is over, and where users find the outputs (output.uri, not pod paths).
    assert status["progress"]["stage"] == "Completed"
    assert status["progress"]["etaSeconds"] == 0
    assert status["artifact"]["uri"] == "pvc://mine-checkpoints/output/model/model"
    assert status["artifact"]["modelCard"] == "pvc://mine-checkpoints/output/model/README.md"
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "README.md").is_file()

    # The same token may not touch another job's status, nor its own job's spec.
    api = _api_client({STATUS_KUBECONFIG_ENV: str(kubeconfig)})
    assert api is not None
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as other:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "other", {"status": {"progress": {"step": 1}}}
        )
    assert other.value.status == 403
    with pytest.raises(ApiException) as spec:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "mine", {"spec": {"method": "full"}}
        )
    assert spec.value.status == 403
    other_status = json.loads(cluster.kubectl("get", "ftj", "other", "-n", namespace, "-o", "json").stdout)
    assert "progress" not in other_status.get("status", {})

    # A refused patch is logged and counted, never raised into the training loop.
    patcher = StatusPatcher(api, "other", namespace, throttle_seconds=0)
    patcher.submit({"progress": {"step": 2}})
    patcher.close()
    assert patcher.errors == 1
    assert patcher.patches_sent == 0
