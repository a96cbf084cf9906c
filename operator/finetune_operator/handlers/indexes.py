"""kopf indexes (what the reconcilers read instead of listing) and the typed view of them.

Each index has an explicit id, which is also the name of the kwarg kopf passes it under; `KopfIndexes` reads
them by those ids and raises if one is missing, so renaming a function can't silently empty an index.
kopf fills every index before any resource handler runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.api.conditions import is_true
from finetune_operator.api.finetunejob import CONDITION_ADMITTED, PLURAL
from finetune_operator.api.finetunejob_status import derive_phase, is_terminal
from finetune_operator.builders.common import JOB_LABEL
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.summaries import (
    FtjSummary,
    JobSummary,
    PodSummary,
    owner_key,
    summarize_job,
    summarize_pod,
)
from finetune_operator.timestamps import parse_rfc3339

TRAINER_JOBS = "trainer_jobs"
TRAINER_PODS = "trainer_pods"
FINETUNEJOBS = "finetunejobs"
OURS = {JOB_LABEL: kopf.PRESENT}
"""Our children carry the owner label (startup also sets it as a server-side label selector)."""


@kopf.index("batch/v1", "jobs", labels=OURS, id=TRAINER_JOBS)
async def index_trainer_jobs(
    *, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[str, JobSummary] | None:
    key = owner_key(namespace, labels)
    return {key: summarize_job(body)} if key else None


@kopf.index("v1", "pods", labels=OURS, id=TRAINER_PODS)
async def index_trainer_pods(
    *, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[str, PodSummary] | None:
    key = owner_key(namespace, labels)
    return {key: summarize_pod(body)} if key else None


@kopf.index(GROUP, VERSION, PLURAL, id=FINETUNEJOBS)
async def index_finetunejobs(
    *, body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any
) -> dict[str, FtjSummary] | None:
    """All FineTuneJobs under one key, as the small facts that GPU admission needs."""
    ref = f"{namespace}/{name}"
    runtime: Runtime = memo.runtime  # (index handlers are not passed the indexes)
    demand = runtime.gang.demand_of(ref, body)
    if demand is None:
        return None
    conditions = list((body.get("status") or {}).get("conditions") or [])
    created = parse_rfc3339(body.metadata["creationTimestamp"])
    assert created is not None, "the API server always sets creationTimestamp"
    summary = FtjSummary(
        key=ref,
        namespace=str(namespace),
        created=created,
        spec=demand,
        terminal=is_terminal(conditions),
        admitted=is_true(conditions, CONDITION_ADMITTED),
        phase=derive_phase(conditions),
    )
    return {"all": summary}


class KopfIndexes:
    """`controllers.observed.Observed` over kopf's live index views."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        missing = [i for i in (TRAINER_JOBS, TRAINER_PODS, FINETUNEJOBS) if i not in kwargs]
        if missing:
            raise LookupError(f"kopf passed no index {', '.join(missing)} (handler ids changed?)")
        self._jobs: kopf.Index[str, JobSummary] = kwargs[TRAINER_JOBS]
        self._pods: kopf.Index[str, PodSummary] = kwargs[TRAINER_PODS]
        self._finetunejobs: kopf.Index[str, FtjSummary] = kwargs[FINETUNEJOBS]

    def trainer_jobs(self, owner: str) -> list[JobSummary]:
        return list(self._jobs.get(owner, []))

    def trainer_pods(self, owner: str) -> list[PodSummary]:
        return list(self._pods.get(owner, []))

    def finetunejobs(self) -> list[FtjSummary]:
        return list(self._finetunejobs.get("all", []))


def runtime_of(memo: Any, kwargs: Mapping[str, Any]) -> Runtime:
    """The shared runtime, with kopf's indexes handed over on the first call (they are live views)."""
    runtime: Runtime = memo.runtime
    if not isinstance(runtime.observed, KopfIndexes):
        runtime.observed = KopfIndexes(kwargs)
    return runtime
