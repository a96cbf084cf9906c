"""The kind-generic core: the work queue routed by kind, the object cache, the status writer's rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from finetune_operator.api.conditions import set_condition
from finetune_operator.api.finetunejob_status import CONDITION_ORDER
from finetune_operator.controllers.cache import ObjectCache, needs_reconcile
from finetune_operator.controllers.work_queue import ObjectKey, WorkQueue, by_kind
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.timestamps import parse_rfc3339, rfc3339
from tests.unit.test_controller import T0


def body(kind: str = "FineTuneJob", version: str = "5", generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": kind,
        "metadata": {
            "namespace": "ns",
            "name": "a",
            "uid": "u1",
            "resourceVersion": version,
            "generation": generation,
            **meta,
        },
    }


def test_one_queue_routes_each_key_to_its_kinds_reconciler_and_counts_per_kind() -> None:
    metrics = OperatorMetrics()
    seen: list[tuple[str, ObjectKey]] = []

    async def ftj(key: ObjectKey) -> float | None:
        seen.append(("ftj", key))
        return None

    async def mdep(key: ObjectKey) -> float | None:
        seen.append(("mdep", key))
        return None

    async def scenario() -> None:
        queue = WorkQueue(by_kind({"FineTuneJob": ftj, "ModelDeployment": mdep}, metrics), workers=2)
        queue.start()
        # The same namespace/name in two kinds are two keys: neither coalesces into the other.
        queue.enqueue(ObjectKey("FineTuneJob", "ns", "a"))
        queue.enqueue(ObjectKey("ModelDeployment", "ns", "a"))
        await asyncio.sleep(0.05)
        await queue.stop()

    asyncio.run(scenario())
    assert sorted(seen) == [
        ("ftj", ObjectKey("FineTuneJob", "ns", "a")),
        ("mdep", ObjectKey("ModelDeployment", "ns", "a")),
    ]
    for kind in ("FineTuneJob", "ModelDeployment"):
        assert metrics.reconciles.labels(kind=kind, result="ok")._value.get() == 1


def test_a_key_of_an_unregistered_kind_is_an_error_naming_it() -> None:
    reconcile = by_kind({}, OperatorMetrics())
    with pytest.raises(LookupError, match="no reconciler registered for kind 'Widget'"):
        asyncio.run(reconcile(ObjectKey("Widget", "ns", "a")))


def test_the_cache_never_goes_back_to_an_older_version_of_the_same_object() -> None:
    cache = ObjectCache()
    key = cache.remember(body(version="7"))
    assert key == ObjectKey("FineTuneJob", "ns", "a")
    cache.remember(body(version="6"))
    assert cache.get(key)["metadata"]["resourceVersion"] == "7"  # type: ignore[index]
    cache.remember(body(version="2", uid="u2"))  # recreated under the same name: the new object wins
    assert cache.get(key)["metadata"]["uid"] == "u2"  # type: ignore[index]


def test_a_reconcile_is_due_when_new_spec_changed_or_deletion_began_not_on_status_writes() -> None:
    cache = ObjectCache()
    assert cache.observe(body(version="1"))
    assert not cache.observe(body(version="2"))  # a status write: same generation
    assert cache.observe(body(version="3", generation=2))
    assert cache.observe(body(version="4", generation=2, deletionTimestamp="2026-01-01T00:00:00Z"))
    assert needs_reconcile(body(), body(uid="u2"))


def test_conditions_follow_the_order_the_kind_passes() -> None:
    conditions = set_condition([], "Running", True, "r", "", generation=1, now=T0, order=CONDITION_ORDER)
    conditions = set_condition(
        conditions, "Admitted", True, "a", "", generation=1, now=T0, order=CONDITION_ORDER
    )
    assert [c["type"] for c in conditions] == ["Admitted", "Running"]
    unordered = set_condition(conditions[1:], "Admitted", True, "a", "", generation=1, now=T0)
    assert [c["type"] for c in unordered] == ["Running", "Admitted"]


def test_one_rfc3339_format_both_ways() -> None:
    assert rfc3339(T0) == "2026-01-01T00:00:00Z"
    assert parse_rfc3339("2026-01-01T00:00:00Z") == T0
    assert parse_rfc3339("2026-01-01T01:00:00+01:00") == T0
    assert parse_rfc3339("") is None
