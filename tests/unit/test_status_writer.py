"""The kind-generic status writer and the typed view of kopf's indexes, without a cluster.

The writer runs on a real `Runtime` and a real `KubeClient`; only the HTTP round trip (`KubeClient.request`,
the k8s.py boundary) is answered in-process, so what is checked is the requests the API server would get.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from finetune_operator.api.finetunejob import CONDITION_ADMITTED, CONDITION_RUNNING
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import STATUS_RULES
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.status import StatusWriter
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.handlers.indexes import FINETUNEJOBS, TRAINER_JOBS, TRAINER_PODS, KopfIndexes
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics
from tests.unit.test_controller import T0

OBJECT_PATH = "/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs/a"
STATUS_PATH = f"{OBJECT_PATH}/status"
EVENTS_PATH = "/api/v1/namespaces/ns/events"


class InProcessApi(KubeClient):
    """A `KubeClient` whose HTTP round trip is answered here: status merge patches are applied to one
    stored object, which can be deleted; Events are kept; every request is recorded."""

    def __init__(self, session: aiohttp.ClientSession, stored: dict[str, Any]) -> None:
        super().__init__(session, "https://api.invalid")
        self.stored = stored
        self.requests: list[tuple[str, str, Any]] = []

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        self.requests.append((method, path, copy.deepcopy(body)))
        if (method, path) == ("PATCH", STATUS_PATH):
            assert content_type == "application/merge-patch+json"
            status = self.stored.setdefault("status", {})
            status.update(body["status"])
            meta = self.stored["metadata"]
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
            return copy.deepcopy(self.stored)
        if (method, path) == ("POST", EVENTS_PATH):
            return dict(body)
        if (method, path) == ("DELETE", OBJECT_PATH):
            return {"kind": "Status", "status": "Success"}
        raise AssertionError(f"unexpected request {method} {path}")

    def patches(self) -> list[dict[str, Any]]:
        return [body["status"] for method, path, body in self.requests if path == STATUS_PATH]

    def events(self) -> list[tuple[str, str, str]]:
        return [(b["type"], b["reason"], b["message"]) for m, path, b in self.requests if path == EVENTS_PATH]

    def deleted(self) -> bool:
        return ("DELETE", OBJECT_PATH) in [(method, path) for method, path, _ in self.requests]


def finetunejob() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"namespace": "ns", "name": "a", "uid": "u1", "resourceVersion": "5", "generation": 1},
        "status": {
            "phase": "Pending",
            "observedGeneration": 1,
            "conditions": [],
            "progress": {"step": 7, "totalSteps": 100},  # the trainer's: never in our patches
        },
    }


def run_writes(*steps: list[tuple[str, bool, str, str]]) -> tuple[InProcessApi, Runtime]:
    """One StatusWriter per step (one reconcile each), each setting its conditions and committing twice."""

    async def scenario() -> tuple[InProcessApi, Runtime]:
        async with aiohttp.ClientSession() as session:
            api = InProcessApi(session, finetunejob())
            runtime = Runtime(api, OperatorConfig(), OperatorMetrics())
            for i, conditions in enumerate(steps):
                body = runtime.cache.get(ObjectKey("FineTuneJob", "ns", "a")) or finetunejob()
                writer = StatusWriter(runtime, body, T0 + timedelta(seconds=i), STATUS_RULES)
                for condition in conditions:
                    writer.set(*condition)
                await writer.commit()
                await writer.commit()  # nothing new: no second patch, no second Event
            await asyncio.gather(*runtime.background)
            return api, runtime

    return asyncio.run(scenario())


def test_the_status_writer_patches_only_the_operator_fields_that_changed() -> None:
    api, runtime = run_writes(
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],  # the same: no patch
        [(CONDITION_ADMITTED, True, "GangAdmitted", "1 node x 8 GPUs on n0")],
    )
    first, second = api.patches()
    assert set(first) == {"conditions", "phase"}  # observedGeneration was already 1; progress is not ours
    assert first["phase"] == "Queued"
    assert [c["type"] for c in first["conditions"]] == [CONDITION_ADMITTED]
    assert set(second) == {"conditions", "phase"}
    assert second["conditions"][0]["reason"] == "GangAdmitted"
    stored = runtime.cache.get(ObjectKey("FineTuneJob", "ns", "a"))
    assert stored is not None
    assert stored["metadata"]["resourceVersion"] == "7"  # the patched object, cached
    assert stored["status"]["progress"] == {"step": 7, "totalSteps": 100}


def test_the_status_writer_posts_one_event_per_phase_transition() -> None:
    api, _ = run_writes(
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs")],
        [(CONDITION_ADMITTED, False, "WaitingForCapacity", "needs 8 GPUs, 4 free")],  # Queued still
        [(CONDITION_ADMITTED, True, "GangAdmitted", "on n0"), (CONDITION_RUNNING, True, "PodsRunning", "")],
        [(CONDITION_RUNNING, False, "Restarting", "pod a-0 exited 1")],
    )
    assert len(api.patches()) == 4  # the message changed in the second step: patched, but no transition
    assert api.events() == [
        ("Normal", "WaitingForCapacity", "needs 8 GPUs"),  # Pending -> Queued
        ("Normal", "PodsRunning", "phase is now Running"),  # Queued -> Running (an empty message)
        ("Warning", "Restarting", "pod a-0 exited 1"),  # Running -> Restarting
    ]


def test_kopf_indexes_refuse_a_missing_index_by_its_id() -> None:
    with pytest.raises(LookupError, match=f"kopf passed no index {TRAINER_PODS}, {FINETUNEJOBS}"):
        KopfIndexes({TRAINER_JOBS: {}})
    indexes = KopfIndexes({TRAINER_JOBS: {}, TRAINER_PODS: {"ns/a": ["pod"]}, FINETUNEJOBS: {}})
    assert indexes.trainer_pods("ns/a") == ["pod"]
    assert indexes.trainer_jobs("ns/a") == []
    assert indexes.finetunejobs() == []
