"""A FineTuneJob whose spec the typed model refuses (it should not pass the CRD) fails with `InvalidSpec`
and then ends like every other failed job: GPUs released, status committed, deleted after its TTL.

Runs the real reconciler on a real `Runtime`; only the HTTP round trip is answered in-process
(`InProcessApi`, see test_status_writer.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from finetune_operator.api.finetunejob import CONDITION_FAILED
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import reconcile_finetunejob
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.metrics import OperatorMetrics
from tests.unit.test_status_writer import InProcessApi, finetunejob

KEY = ObjectKey("FineTuneJob", "ns", "a")


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
