"""The kind-generic status writer against the dev cluster's API server: a real FineTuneJob, real status
patches and real Events. The client records the status patches it sends (to check that only what changed is
sent); the API server answers every request."""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import kopf
import pytest

from finetune_operator.api.common import API_VERSION
from finetune_operator.api.finetunejob import CONDITION_ADMITTED, CONDITION_RUNNING, KIND
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import STATUS_RULES
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.status import StatusWriter
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics
from tests.kube_helpers import Cluster, kubectl_json
from tests.unit.test_controller import T0

Steps = list[tuple[str, bool, str, str]]


class RecordingClient(KubeClient):
    """The operator's client, keeping a copy of each status patch it sends."""

    patches: list[dict[str, Any]]

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        if method == "PATCH" and path.endswith("/status"):
            self.patches.append(copy.deepcopy(body["status"]))
        return await super().request(method, path, params=params, body=body, content_type=content_type)


def run_writes(
    cluster: Cluster, namespace: str, *steps: Steps
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A FineTuneJob with a trainer-owned `progress`; then one StatusWriter per step (one reconcile each),
    each setting its conditions and committing twice. Returns the status patches sent and the stored job."""
    cluster.apply(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "a"},
            "spec": {
                "task": "causal-lm",
                "model": {"source": "hf://org/tiny"},
                "dataset": {"source": "pvc://data/train.jsonl"},
                "scheduling": {"suspend": True},
            },
        },
        namespace,
    )
    cluster.kubectl(
        "patch", "finetunejob", "a", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status": {"phase": "Pending", "progress": {"step": 7, "totalSteps": 100}}}',
    )  # fmt: skip

    async def scenario() -> list[dict[str, Any]]:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)  # the test session's cluster, as kopf reads it
        info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        client = RecordingClient.from_connection_info(info)
        assert isinstance(client, RecordingClient)
        client.patches = []
        try:
            runtime = Runtime(client, OperatorConfig(), OperatorMetrics())
            key = ObjectKey("FineTuneJob", namespace, "a")
            for i, conditions in enumerate(steps):
                body = runtime.cache.get(key) or await client.get(API_VERSION, KIND, "a", namespace)
                assert body is not None
                writer = StatusWriter(runtime, body, T0 + timedelta(seconds=i), STATUS_RULES)
                for condition in conditions:
                    writer.set(*condition)
                await writer.commit()
                await writer.commit()  # nothing new: no second patch, no second Event
            await asyncio.gather(*runtime.background)
        finally:
            await client.close()
        return client.patches

    patches = asyncio.run(scenario())
    return patches, kubectl_json(cluster, "get", "finetunejob", "a", "-n", namespace)


def events(cluster: Cluster, namespace: str) -> list[tuple[str, str, str]]:
    """The FineTuneJob's Events, sorted: they are posted by background tasks, stamped to the second, so the
    API server keeps no order among those of one reconcile burst."""
    items = kubectl_json(
        cluster, "get", "events", "-n", namespace, "--field-selector", "involvedObject.kind=FineTuneJob"
    )["items"]
    return sorted((e["type"], e["reason"], e["message"]) for e in items)


@pytest.mark.usefixtures("crds")
def test_the_status_writer_patches_only_the_operator_fields_that_changed(
    cluster: Cluster, namespace: str
) -> None:
    patches, stored = run_writes(
        cluster,
        namespace,
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],  # the same: no patch
        [(CONDITION_ADMITTED, True, "GangAdmitted", "1 node x 8 GPUs on n0")],
    )
    first, second = patches
    assert set(first) == {"conditions", "phase", "observedGeneration"}
    assert first["phase"] == "Queued"
    assert [c["type"] for c in first["conditions"]] == [CONDITION_ADMITTED]
    assert set(second) == {"conditions", "phase"}
    assert second["conditions"][0]["reason"] == "GangAdmitted"
    assert stored["status"]["progress"] == {"step": 7, "totalSteps": 100}  # the trainer's, untouched
    assert stored["status"]["conditions"][0]["reason"] == "GangAdmitted"


@pytest.mark.usefixtures("crds")
def test_the_status_writer_posts_one_event_per_phase_transition(cluster: Cluster, namespace: str) -> None:
    patches, _ = run_writes(
        cluster,
        namespace,
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs, 4 free")],  # Queued still
        [(CONDITION_ADMITTED, True, "GangAdmitted", "on n0"), (CONDITION_RUNNING, True, "PodsRunning", "")],
        [(CONDITION_RUNNING, False, "Restarting", "pod a-0 exited 1")],
    )
    assert len(patches) == 4  # the message changed in the second step: patched, but no transition
    assert events(cluster, namespace) == sorted(
        [
            ("Normal", "WaitingForCapacity", "needs 8 GPUs"),  # Pending -> Queued
            ("Normal", "PodsRunning", "phase is now Running"),  # Queued -> Running (an empty message)
            ("Warning", "Restarting", "pod a-0 exited 1"),  # Running -> Restarting
        ]
    )
