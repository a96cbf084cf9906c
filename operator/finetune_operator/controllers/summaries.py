"""The small facts kept in kopf indexes: summaries of our trainer Jobs and Pods (keyed by their owner,
`namespace/name`) and of each FineTuneJob (what gang admission needs). Pure: bodies in, tuples out."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from finetune_operator.builders.common import ATTEMPT_LABEL, JOB_LABEL, TRAINER_CONTAINER
from finetune_operator.scheduling.capacity import pod_gpu_request

_EXIT_CODE_RE = re.compile(r"exit code (\d+)")

#: Set by Kubernetes on a pod it is taking away; reasons (k8s.io/api/core/v1 `PodReason*`):
#: EvictionByEvictionAPI (`kubectl drain`), PreemptionByScheduler, DeletionByTaintManager (NoExecute
#: taint, e.g. an unreachable node), DeletionByPodGC (its node was deleted), TerminationByKubelet.
DISRUPTION_CONDITION = "DisruptionTarget"


class JobSummary(NamedTuple):
    name: str
    attempt: int
    complete: bool
    failed: bool
    reason: str
    message: str
    suspended: bool
    deleting: bool


class PodSummary(NamedTuple):
    name: str
    attempt: int
    rank: str
    phase: str
    node: str
    gpus: int
    exit_code: int | None
    message: str
    disrupted: bool
    deleting: bool

    @property
    def failed(self) -> bool:
        """The pod failed on its own (its trainer exited non-zero). A pod that Kubernetes took away
        (eviction, preemption, node loss) ends in phase Failed too, but is `disrupted` instead: its exit
        code is SIGTERM's (or missing, when its node is gone) and says nothing about the training."""
        return self.phase == "Failed" and not self.disrupted

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def owner_key(namespace: str | None, labels: Mapping[str, str]) -> str | None:
    owner = labels.get(JOB_LABEL)
    return f"{namespace}/{owner}" if owner and namespace else None


def _attempt(labels: Mapping[str, str]) -> int:
    try:
        return int(labels.get(ATTEMPT_LABEL, "0"))
    except ValueError:
        return 0


def summarize_job(body: Mapping[str, Any]) -> JobSummary:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
    return JobSummary(
        name=str(meta.get("name")),
        attempt=_attempt(meta.get("labels") or {}),
        complete="Complete" in conditions,
        failed=bool(failed),
        reason=str(failed.get("reason") or ""),
        message=str(failed.get("message") or ""),
        suspended=bool((body.get("spec") or {}).get("suspend")),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def summarize_pod(body: Mapping[str, Any]) -> PodSummary:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    exit_code: int | None = None
    message = str(status.get("message") or status.get("reason") or "")
    for container in status.get("containerStatuses") or []:
        if container.get("name") != TRAINER_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated") or (
            container.get("lastState") or {}
        ).get("terminated")
        if terminated:
            exit_code = int(terminated.get("exitCode", 0))
            message = str(terminated.get("message") or terminated.get("reason") or message)
    phase = str(status.get("phase") or "Pending")
    # A pod that had already completed when Kubernetes came to take it away was not disrupted.
    disruption = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == DISRUPTION_CONDITION and c.get("status") == "True" and phase != "Succeeded"
        ),
        None,
    )
    if disruption is not None:
        # The cause, in Kubernetes' words (`DeletionByPodGC: PodGC: node no longer exists`), not the
        # container's SIGTERM exit that followed it.
        message = ": ".join(str(disruption[k]) for k in ("reason", "message") if disruption.get(k))
    return PodSummary(
        name=str(meta.get("name")),
        attempt=_attempt(meta.get("labels") or {}),
        rank=str((meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "")),
        phase=phase,
        node=str((body.get("spec") or {}).get("nodeName") or ""),
        gpus=pod_gpu_request(body),
        exit_code=exit_code,
        message=message.strip()[-500:],
        disrupted=disruption is not None,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def exit_code_from_message(message: str) -> int | None:
    """The code in a Job's `PodFailurePolicy` message (`... failed with exit code 3 matching FailJob ...`)."""
    match = _EXIT_CODE_RE.search(message)
    return int(match.group(1)) if match else None


def of_attempt(items: Iterable[Any], attempt: int) -> list[Any]:
    return [item for item in items if item.attempt == attempt]


class SpecDemand(NamedTuple):
    """What admission needs from a FineTuneJob's spec (parsed once per generation)."""

    priority: int
    nodes: int
    gpus_per_node: int
    node_selector: tuple[tuple[str, str], ...]
    tolerations: tuple[Mapping[str, Any], ...]
    queue_name: str | None
    suspend: bool
    gpu_resource: str
    """The extended resource the pods request (`resources.gpuResourceName`)."""


class FtjSummary(NamedTuple):
    """What admission needs to know about one FineTuneJob (a kopf index value)."""

    key: str
    namespace: str
    created: datetime
    spec: SpecDemand
    terminal: bool
    admitted: bool
    phase: str
