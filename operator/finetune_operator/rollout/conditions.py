"""The ModelDeployment's conditions from what runs. Pure: the controller reads, this module judges.

kstatus semantics, so `kubectl wait --for=condition=Ready`, Flux and Argo CD read health right:

    ModelReady   the spec's revision has a pod whose model loaded and passed its quality gate (False with
                 the server's reason, e.g. QualityGateFailed with the measured drop; or WaitingForFineTuneJob)
    Available    at least one server pod is ready behind the Service
    Progressing  True while a rollout (rolling update, canary, promotion) is underway; False once the spec's
                 revision serves everything (RolloutComplete) or the rollout stopped (RolledBack)
    Degraded     True when the spec's revision was rolled back, or fewer replicas are ready than wanted
    Ready        ModelReady and Available, not Progressing, not Degraded
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_operator.rollout.plan import ObservedDeployment, RolloutPlan

ConditionValue = tuple[bool, str, str]
"""(status, reason, message)."""


@dataclass(frozen=True)
class ModelWait:
    """Why the model can't be served yet (or at all): the FineTuneJob hasn't succeeded, the spec can't be
    rendered, ..."""

    reason: str
    message: str
    terminal: bool = False
    """No reconcile will fix it without a spec change (Degraded)."""


def _fmt_bytes(size: Any) -> str:
    return f"{float(size) / 1e6:.1f} MB" if isinstance(size, int | float) else "?"


def quality_summary(results: Sequence[Mapping[str, Any]]) -> str:
    """`int8-dynamic: perplexity 4.48 -> 4.52 (drop 0.9 %, max 2.0 %), 500.0 MB -> 130.0 MB` per step."""
    parts = []
    for result in results:
        drop, limit = result.get("qualityDrop"), result.get("maxQualityDrop")
        figures = f"{result.get('metric')} {result.get('baseline'):.4g} -> {result.get('value'):.4g}"
        if isinstance(drop, int | float) and isinstance(limit, int | float):
            figures += f" (drop {drop * 100:.1f} %, max {limit * 100:.1f} %)"
        size = f"{_fmt_bytes(result.get('originalSizeBytes'))} -> {_fmt_bytes(result.get('sizeBytes'))}"
        parts.append(f"{result.get('method')}: {figures}, {size}")
    return "; ".join(parts)


def model_ready(wait: ModelWait | None, health: Sequence[Mapping[str, Any]]) -> ConditionValue:
    """From the readiness answers of the spec's revision's pods (`finetune_server`'s `/v2/health/ready`)."""
    if wait is not None:
        return False, wait.reason, wait.message
    ready = sorted((h for h in health if h.get("ready")), key=lambda h: bool(h.get("probeOnly")))
    if ready:
        if ready[0].get("probeOnly"):
            return True, "ServerReady", "a server pod passes its readiness probe (model loaded, gate passed)"
        summary = quality_summary(ready[0].get("quality") or [])
        return True, "ModelLoaded", summary or "model loaded, uncompressed"
    failed = [h for h in health if h.get("phase") == "Failed"]
    if failed:
        answer = failed[0]
        reason = str(answer.get("reason") or "ModelLoadFailed")
        summary = quality_summary(answer.get("quality") or [])
        message = str(answer.get("message") or "the server could not load the model")
        return False, reason, f"{message}; {summary}" if summary else message
    if any(not h.get("probeOnly") for h in health):
        return False, "Loading", "the server is loading and measuring the model"
    if health:
        return False, "Loading", "no server pod of this revision passes its readiness probe yet"
    return False, "NoServerAnswer", "no server pod of this revision answers its readiness probe yet"


def available(stable: ObservedDeployment | None, canary: ObservedDeployment | None) -> ConditionValue:
    ready = (stable.ready_replicas if stable else 0) + (canary.ready_replicas if canary else 0)
    if ready > 0:
        return True, "MinimumReplicasAvailable", f"{ready} server replica(s) ready behind the Service"
    return False, "NoReplicasReady", "no server replica is ready"


def progressing(
    plan: RolloutPlan, stable: ObservedDeployment | None, wait: ModelWait | None
) -> ConditionValue:
    if wait is not None:
        return False, wait.reason, wait.message
    if plan.phase == "RolledBack":
        revision = plan.memory.failed_revision
        return False, "RolledBack", f"revision {revision} was rolled back; change the spec to try again"
    if plan.phase == "Canary":
        decision = plan.decision
        message = (
            decision.message if decision else f"canary {plan.memory.canary_revision} at {plan.split.weight} %"
        )
        return True, "CanaryInProgress", message
    if plan.phase == "Completing":
        return True, "Promoting", f"the stable Deployment rolls to revision {plan.memory.canary_revision}"
    revision = plan.memory.stable_revision
    if stable is None:
        return True, "Deploying", f"creating the server Deployment for revision {revision}"
    if stable.revision != revision or not stable.rolled_out or plan.canary:
        return (
            True,
            "RollingUpdate",
            f"{stable.updated_replicas} of {stable.replicas} replicas run revision {revision}, "
            f"{stable.ready_replicas} ready",
        )
    return False, "RolloutComplete", f"revision {revision} serves all traffic"


SERVER_FAILURES = ("QualityGateFailed", "ModelLoadFailed")
"""ModelReady reasons no reconcile can fix without a spec change."""


def degraded(
    plan: RolloutPlan,
    stable: ObservedDeployment | None,
    wait: ModelWait | None,
    model: ConditionValue | None = None,
) -> ConditionValue:
    if wait is not None and wait.terminal:
        return True, wait.reason, wait.message
    if model is not None and not model[0] and model[1] in SERVER_FAILURES and plan.phase != "RolledBack":
        return True, model[1], model[2]
    if plan.phase == "RolledBack":
        return True, "RolledBack", f"revision {plan.memory.failed_revision} failed its canary analysis"
    if stable is not None and stable.stalled:
        return (
            True,
            "ProgressDeadlineExceeded",
            f"{stable.available_replicas} of {stable.replicas} replicas available"
            " past the Deployment's progress deadline",
        )
    return False, "AsExpected", "nothing is degraded"


def ready(values: Mapping[str, ConditionValue]) -> ConditionValue:
    """The summary: the first condition that keeps it from Ready explains it."""
    for type_, wanted in (
        ("ModelReady", True),
        ("Available", True),
        ("Degraded", False),
        ("Progressing", False),
    ):
        status, reason, message = values[type_]
        if status != wanted:
            return False, reason, message
    return True, "Serving", values["ModelReady"][2]
