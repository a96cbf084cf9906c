"""A FineTuneJob whose spec the typed model refuses (it should not pass the CRD) fails with `InvalidSpec`
and then ends like every other failed job: GPUs released, status committed, deleted after its TTL.

Runs the real reconciler on a real `Runtime`; only the HTTP round trip is answered in-process
(`InProcessApi`): a spec the CRD refuses cannot be stored on the dev cluster's API server, which is the case
this covers (an object stored before the schema tightened, or a CRD another tool installed)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from finetune_operator.api.finetunejob import CONDITION_FAILED
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import reconcile_finetunejob
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics

KEY = ObjectKey("FineTuneJob", "ns", "a")
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


def reconcile_twice(scheduling: dict[str, Any]) -> tuple[InProcessApi, list[float | None]]:
    """Reconcile an invalid job (an unknown task) twice: the failing one, then one that finds it failed."""

    async def scenario() -> tuple[InProcessApi, list[float | None]]:
        async with aiohttp.ClientSession() as session:
            body = finetunejob()
            body["spec"] = {"task": "telepathy", "scheduling": scheduling}
            api = InProcessApi(session, body)
            runtime = Runtime(api, OperatorConfig(), OperatorMetrics())
            runtime.cache.remember(body)
            requeues = [await reconcile_finetunejob(runtime, KEY), await reconcile_finetunejob(runtime, KEY)]
            await asyncio.gather(*runtime.background)
            return api, requeues

    return asyncio.run(scenario())


def test_an_invalid_spec_fails_once_with_a_warning_naming_the_field() -> None:
    api, requeues = reconcile_twice({})
    (patch,) = api.patches()  # the second reconcile finds it failed: nothing to write
    assert patch["phase"] == "Failed"
    assert patch["completionTime"]
    failed = next(c for c in patch["conditions"] if c["type"] == CONDITION_FAILED)
    assert failed["reason"] == "InvalidSpec"
    assert "spec.task" in failed["message"]
    assert [(type_, reason) for type_, reason, _ in api.events()] == [("Warning", "InvalidSpec")]
    assert requeues == [None, None]
    assert not api.deleted()


def test_an_invalid_job_is_deleted_after_its_ttl_like_any_failed_job() -> None:
    api, requeues = reconcile_twice({"ttlSecondsAfterFinished": 0})
    assert api.deleted()
    api, requeues = reconcile_twice({"ttlSecondsAfterFinished": 600})
    assert not api.deleted()
    assert all(r is not None and 590 < r <= 600 for r in requeues)  # woken again when the TTL runs out


@pytest.mark.parametrize(
    "scheduling", [{"ttlSecondsAfterFinished": -1}, {"ttlSecondsAfterFinished": 0, "unknownField": 1}]
)
def test_without_a_valid_scheduling_section_there_is_no_ttl(scheduling: dict[str, Any]) -> None:
    api, requeues = reconcile_twice(scheduling)
    assert not api.deleted()
    assert requeues == [None, None]
