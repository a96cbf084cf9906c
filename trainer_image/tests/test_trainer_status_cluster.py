"""Status reporting against the dev cluster with a ServiceAccount token that may only patch its own job."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    cluster: Any, crds: list[str], namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
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
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.reporting"):
        patcher.close()
    assert patcher.errors == 1
    assert patcher.patches_sent == 0
    # Tried once (the answer would not change), and the log carries the API server's own reason.
    (refusal,) = [r.getMessage() for r in caplog.records if "status patch" in r.getMessage()]
    assert "attempt 1 of 3" in refusal, refusal
    assert "trying again" not in refusal, refusal
    assert "403 Forbidden" in refusal, refusal
    assert 'cannot patch resource "finetunejobs/status"' in refusal, refusal


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class DroppingProxy:
    """A loopback TCP proxy to the API server that, once told to, takes the next request sent on any
    connection and, after ``STALL_SECONDS`` without an answer, closes that connection: what a client sees
    when a connection it kept open stalls and dies under it (an idle timeout, a load balancer, a node's
    network changing)."""

    #: Longer than StatusPatcher.close() waits for its thread to finish (throttle + 1 s): the patch taken
    #: before close() is still being tried when close() sends the last one.
    STALL_SECONDS = 1.5

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.drop_next = threading.Event()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, may_drop: bool) -> None:
        try:
            while data := src.recv(65536):
                if may_drop and self.drop_next.is_set():
                    self.drop_next.clear()
                    self.dropped += 1
                    time.sleep(self.STALL_SECONDS)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_patch_whose_connection_dies_unanswered_is_sent_again(
    cluster: Any, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    cluster.apply([_job("mine")], namespace=namespace)
    kubeconfig = _trainer_kubeconfig(cluster, namespace, "mine", tmp_path)
    config = yaml.safe_load(kubeconfig.read_text())
    server = urlsplit(config["clusters"][0]["cluster"]["server"])
    assert server.hostname is not None
    assert server.port is not None
    proxy = DroppingProxy((server.hostname, server.port))
    try:
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.address[1]}"
        kubeconfig.write_text(yaml.safe_dump(config))
        api = _api_client({STATUS_KUBECONFIG_ENV: str(kubeconfig)})
        patcher = StatusPatcher(api, "mine", namespace, throttle_seconds=0)
        patcher.submit({"progress": {"step": 1}})
        wait_until(lambda: patcher.patches_sent == 1, 30, "the first patch")
        # The connection the client keeps for its next request stalls and dies with that request unanswered.
        proxy.drop_next.set()
        patcher.submit({"progress": {"step": 2}})
        wait_until(lambda: proxy.dropped == 1, 30, "the patch of step 2 to be sent and stalled")
        # The last status comes while step 2 is still being tried: it must land after it, not before.
        patcher.submit(
            {"progress": {"step": 3}, "artifact": {"uri": "pvc://mine-checkpoints/output/model/model"}}
        )
        patcher.close()
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert (patcher.patches_sent, patcher.errors) == (3, 0)
    status = json.loads(cluster.kubectl("get", "ftj", "mine", "-n", namespace, "-o", "json").stdout)["status"]
    assert status["artifact"]["uri"] == "pvc://mine-checkpoints/output/model/model"
    assert status["progress"]["step"] == 3
