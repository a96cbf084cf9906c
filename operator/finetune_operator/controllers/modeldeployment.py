"""reconcile_modeldeployment: level-triggered, on the shared work queue, through the kind-generic status
writer.

Each call: parse the ModelDeployment; resolve its model (a Succeeded FineTuneJob's artifact, or `uri`; the
deployment waits with `ModelReady=False, WaitingForFineTuneJob` until the job succeeded); render the
revision the spec asks for; read what runs (the stable and canary Deployments); when a canary is due for
analysis, read its pods' metrics (`metric_reads`) and judge them (`rollout`); plan the rollout
(`rollout.plan`); apply the children (server-side apply) and delete what the plan drops; read the servers'
readiness answers for the quality gate's figures; write status (`rollout.conditions`), one Event and one
history entry per rollout decision. The return value asks for the next reconcile in N s.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from finetune_operator.api.common import API_VERSION, InvalidResourceError
from finetune_operator.api.conditions import find
from finetune_operator.api.finetunejob import CONDITION_FAILED, CONDITION_SUCCEEDED
from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.api.modeldeployment import (
    CONDITION_AVAILABLE,
    CONDITION_DEGRADED,
    CONDITION_MODEL_READY,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    CONDITION_TYPES,
    KIND,
    MAX_HISTORY,
    ModelDeployment,
    ResolvedModel,
    RolloutStatus,
    parse_modeldeployment,
)
from finetune_operator.builders.server_config import ServingBuildError
from finetune_operator.builders.server_deployment import ServingRevision, build_revision
from finetune_operator.builders.serving import ClusterFeatures, ServingPlan, build_serving_children, routed
from finetune_operator.builders.serving_common import (
    CANARY,
    DEPLOYMENT_LABEL,
    REVISION_LABEL,
    ROLE_LABEL,
    SERVER_PORT,
    STABLE,
    api_keys_secret_name,
    endpoint,
    server_config_name,
    server_deployment_name,
)
from finetune_operator.builders.serving_extras import build_api_keys_secret
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.status import StatusRules, StatusWriter
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.k8s import ApiError
from finetune_operator.metric_reads import query_prometheus, read_readiness, read_sample
from finetune_operator.rollout import ServingSample, Step, Thresholds, judge, window
from finetune_operator.rollout.analysis import Judgement
from finetune_operator.rollout.conditions import (
    ModelWait,
    available,
    degraded,
    model_ready,
    progressing,
    ready,
)
from finetune_operator.rollout.plan import (
    ObservedDeployment,
    RolloutMemory,
    RolloutPlan,
    history_action,
    needs_analysis,
    plan_rollout,
)
from finetune_operator.timestamps import rfc3339

logger = logging.getLogger(__name__)

STATUS_RULES = StatusRules(
    owned_fields=(
        "observedGeneration",
        "conditions",
        "endpoint",
        "apiKeySecret",
        "model",
        "replicas",
        "readyReplicas",
        "revisions",
        "rollout",
        "quantization",
        "pruning",
    ),
    condition_order=CONDITION_TYPES,
)
WAITING_REQUEUE_SECONDS = 10.0
"""How often a deployment waiting for its FineTuneJob looks again (the job's events don't wake it)."""
PROGRESS_REQUEUE_SECONDS = 5.0
"""How often a deployment whose model isn't ready yet asks its servers again."""
FEATURES_TTL_SECONDS = 60.0
OPTIONAL_APIS = {
    "gateway_api": "/apis/gateway.networking.k8s.io/v1",
    "prometheus_operator": "/apis/monitoring.coreos.com/v1",
}


async def reconcile_modeldeployment(runtime: Runtime, key: ObjectKey) -> float | None:
    """Reconcile one ModelDeployment; returns seconds until it wants to run again, or None."""
    assert key.kind == KIND, key
    body = await runtime.current_body(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        runtime.serving.forget(key)
        return None  # children go with their owner (ownerReferences + garbage collection)
    now = datetime.now(UTC)
    writer = StatusWriter(runtime, body, now, STATUS_RULES)
    try:
        md = parse_modeldeployment(body)
    except InvalidResourceError as exc:
        _not_served(writer, ModelWait("InvalidSpec", str(exc), terminal=True))
        await writer.commit()
        return None
    with runtime.metrics.time_reconcile(KIND):
        return await _reconcile(runtime, key, md, writer, now)


def _not_served(writer: StatusWriter, wait: ModelWait) -> None:
    writer.set(CONDITION_MODEL_READY, False, wait.reason, wait.message)
    writer.set(CONDITION_AVAILABLE, False, wait.reason, wait.message)
    writer.set(CONDITION_PROGRESSING, False, wait.reason, wait.message)
    writer.set(CONDITION_DEGRADED, wait.terminal, wait.reason, wait.message)
    writer.set(CONDITION_READY, False, wait.reason, wait.message)


async def _resolve_model(runtime: Runtime, md: ModelDeployment) -> ResolvedModel | ModelWait:
    ref = md.spec.model
    if ref.uri is not None:
        return ResolvedModel(
            uri=ref.uri,
            base_model=ref.base_model,
            task=ref.task,
            encryption_key_secret_ref=ref.encryption_key_secret_ref,
        )
    assert ref.from_fine_tune_job is not None
    name, namespace = ref.from_fine_tune_job, str(md.metadata["namespace"])
    job = await runtime.client.get(API_VERSION, FINETUNEJOB, name, namespace)
    if job is None:
        return ModelWait("WaitingForFineTuneJob", f"FineTuneJob {name} does not exist (yet)")
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    failed = find(conditions, CONDITION_FAILED)
    if failed and failed.get("status") == "True":
        message = (
            f"FineTuneJob {name} failed ({failed.get('reason')}: {failed.get('message')}); nothing to serve"
        )
        return ModelWait("FineTuneJobFailed", message, terminal=True)
    succeeded = find(conditions, CONDITION_SUCCEEDED)
    artifact = status.get("artifact") or {}
    if not (succeeded and succeeded.get("status") == "True"):
        phase = status.get("phase") or "Pending"
        return ModelWait(
            "WaitingForFineTuneJob", f"FineTuneJob {name} is {phase}; waiting until it Succeeded"
        )
    if not artifact.get("uri"):
        # The trainer reports the artifact in its last status patch; the pods ended without it arriving.
        message = (
            f"FineTuneJob {name} Succeeded but reported no artifact (status.artifact.uri is empty: its "
            "trainer's last status report did not arrive; the trainer log says why)"
        )
        return ModelWait("FineTuneJobHasNoArtifact", message)
    spec = job.get("spec") or {}
    source = str((spec.get("model") or {}).get("source") or "")
    base = (
        source if artifact.get("format") == "adapter" and source.startswith(("pvc://", "file://")) else None
    )
    return ResolvedModel(
        uri=str(artifact.get("claimUri") or artifact["uri"]),
        base_model=base,
        task=spec.get("task"),
        sha256=artifact.get("sha256"),
        fine_tune_job=name,
    )


def _observe(deployment: Mapping[str, Any] | None) -> ObservedDeployment | None:
    if deployment is None:
        return None
    meta, spec, status = deployment["metadata"], deployment.get("spec") or {}, deployment.get("status") or {}
    progressing_condition = find(status.get("conditions") or [], "Progressing") or {}
    return ObservedDeployment(
        revision=str((meta.get("labels") or {}).get(REVISION_LABEL, "")),
        replicas=int(spec.get("replicas", 1)),
        ready_replicas=int(status.get("readyReplicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        observed=status.get("observedGeneration") == meta.get("generation"),
        stalled=progressing_condition.get("reason") == "ProgressDeadlineExceeded",
    )


async def _features(runtime: Runtime) -> ClusterFeatures:
    memory = runtime.serving
    loop = asyncio.get_running_loop()
    if memory.features is not None and loop.time() - memory.features[0] < FEATURES_TTL_SECONDS:
        return memory.features[1]
    found: dict[str, bool] = {}
    for name, path in OPTIONAL_APIS.items():
        try:
            resources = await runtime.client.request("GET", path)
        except ApiError:  # an API group that isn't served answers 404
            found[name] = False
            continue
        kinds = {r.get("kind") for r in resources.get("resources") or []}
        found[name] = ("HTTPRoute" if name == "gateway_api" else "PodMonitor") in kinds
    features = ClusterFeatures(**found)
    memory.features = (loop.time(), features)
    return features


def _memory_of(status: RolloutStatus | None) -> RolloutMemory:
    if status is None:
        return RolloutMemory()
    completing = (
        bool(status.history)
        and status.history[-1].decision == "Completed"
        and status.canary_revision is not None
    )
    return RolloutMemory(
        stable_revision=status.stable_revision,
        canary_revision=status.canary_revision,
        failed_revision=status.failed_revision,
        step=status.step,
        step_started_at=status.step_started_at,
        completing=completing,
    )


async def _server_pods(runtime: Runtime, md: ModelDeployment, **labels: str) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in {DEPLOYMENT_LABEL: str(md.metadata["name"]), **labels}.items())
    pods = await runtime.client.list("v1", "Pod", str(md.metadata["namespace"]), label_selector=selector)
    return [
        p for p in pods if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
    ]


def _pod_url(runtime: Runtime, pod: Mapping[str, Any]) -> str:
    if runtime.config.pod_reads_through_apiserver():
        meta = pod["metadata"]
        return runtime.client.pod_proxy_url(meta["namespace"], meta["name"], SERVER_PORT)
    return f"http://{pod['status']['podIP']}:{SERVER_PORT}"


def _reads_session(runtime: Runtime) -> aiohttp.ClientSession:
    """The API server's authenticated session for proxied reads, else a plain one for pod IPs."""
    return runtime.client.session if runtime.config.pod_reads_through_apiserver() else runtime.serving.http()


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    condition = find((pod.get("status") or {}).get("conditions") or [], "Ready")
    return bool(condition and condition.get("status") == "True")


async def _analyse(
    runtime: Runtime,
    key: ObjectKey,
    md: ModelDeployment,
    memory: RolloutMemory,
    canary: ObservedDeployment | None,
    now: datetime,
    server_failure: str | None,
) -> tuple[Judgement | None, ServingSample | None]:
    """The canary's judgement over its current step (None when no analysis is due yet), and the pods'
    reading it was made from (the next step's baseline if this one is promoted)."""
    spec = md.spec.rollout.canary
    assert spec is not None
    analysis = spec.analysis
    previous = md.status.rollout.analysis if md.status.rollout else None
    if (
        previous
        and previous.checked_at
        and (now - previous.checked_at).total_seconds() < analysis.interval_seconds
    ):
        return None, None
    thresholds = Thresholds(analysis.min_requests, analysis.max_error_rate, analysis.max_p95_latency_ms)
    ready_replicas, replicas = (canary.ready_replicas, canary.replicas) if canary else (0, 0)
    if server_failure is not None:
        return judge(None, thresholds, server_failure=server_failure), None
    session = runtime.serving.http()
    if analysis.prometheus_url:
        started = memory.step_started_at or now
        counts = await query_prometheus(
            session,
            analysis.prometheus_url,
            namespace=key.namespace,
            pod_regex=f"{server_deployment_name(md, CANARY)}-.*",
            window_seconds=int((now - started).total_seconds()),
        )
        return judge(counts, thresholds, ready_replicas=ready_replicas, replicas=replicas), None
    pods = await _server_pods(
        runtime, md, **{ROLE_LABEL: CANARY, REVISION_LABEL: memory.canary_revision or ""}
    )
    sample = await read_sample(
        _reads_session(runtime), {p["metadata"]["name"]: _pod_url(runtime, p) for p in pods}
    )
    baselines = runtime.serving.baselines
    step_key = (key, memory.canary_revision or "", memory.step)
    if step_key not in baselines:
        # No baseline for this step (the operator restarted during it): the window starts at this reading,
        # so it can only hold fewer requests than the step really had (inconclusive longer, never a pass
        # sooner).
        baselines[step_key] = sample
    counts = window(sample, baselines[step_key]) if (sample.pods or not pods) else None
    return judge(counts, thresholds, ready_replicas=ready_replicas, replicas=replicas), sample


def _keep_baseline(runtime: Runtime, key: ObjectKey, plan: RolloutPlan, sample: ServingSample | None) -> None:
    """A new step's window starts at the reading that promoted the canary; a new canary's pods count from
    zero (they are new)."""
    decision, revision = plan.decision, plan.memory.canary_revision
    if decision is None or revision is None:
        return
    if decision.reason == "CanaryStarted":
        runtime.serving.forget(key)
        runtime.serving.baselines[(key, revision, 0)] = ServingSample({})
    elif decision.action == "promote" and sample is not None:
        runtime.serving.baselines[(key, revision, plan.memory.step)] = sample


async def _apply(runtime: Runtime, md: ModelDeployment, children: Sequence[dict[str, Any]]) -> None:
    for child in children:
        await runtime.client.apply(child)


async def _ensure_api_keys(runtime: Runtime, md: ModelDeployment) -> None:
    """Create the generated API-key Secret once (create, not apply: an existing key is kept)."""
    secret = build_api_keys_secret(md, secrets.token_urlsafe(32))
    if secret is not None:
        await runtime.client.create(secret)


async def _delete_dropped(
    runtime: Runtime,
    md: ModelDeployment,
    plan: RolloutPlan,
    stable: Mapping[str, Any] | None,
    revision: ServingRevision,
    *,
    canary_exists: bool,
) -> None:
    namespace = str(md.metadata["namespace"])
    if not plan.canary and canary_exists:
        await runtime.client.delete("apps/v1", "Deployment", server_deployment_name(md, CANARY), namespace)
    keep = {server_config_name(md, revision.name)}
    if stable is not None:
        keep.add(server_config_name(md, str(stable["metadata"].get("labels", {}).get(REVISION_LABEL))))
    selector = f"{DEPLOYMENT_LABEL}={md.metadata['name']},app.kubernetes.io/component=server-config"
    for configmap in await runtime.client.list("v1", "ConfigMap", namespace, label_selector=selector):
        name = configmap["metadata"]["name"]
        if name not in keep:
            await runtime.client.delete("v1", "ConfigMap", name, namespace)


def _gate_results(health: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    answer = next((h for h in health if h.get("ready")), None) or next(iter(health), None)
    results: dict[str, dict[str, Any]] = {}
    for result in (answer or {}).get("quality") or []:
        step = str(result.get("step"))
        results[step] = {k: v for k, v in result.items() if k != "step"}
    return results


async def _health(runtime: Runtime, md: ModelDeployment, revision: str) -> list[dict[str, Any]]:
    """The readiness answers of the revision's pods. vLLM's `/health` has no body, and a pod the operator
    can't reach (e.g. the operator runs outside the pod network) answers nothing: for those the pod's
    Ready condition stands in (its readiness probe is the same endpoint, so Ready means the model loaded
    and passed its gate), without the measured figures."""
    pods = await _server_pods(runtime, md, **{REVISION_LABEL: revision})
    if md.spec.runtime.type == "vllm":
        answers: list[dict[str, Any] | None] = [None] * len(pods)
    else:
        session = _reads_session(runtime)
        answers = list(
            await asyncio.gather(*(read_readiness(session, _pod_url(runtime, p)) for p in pods[:4]))
        )
        answers += [None] * (len(pods) - len(answers))
    out = []
    for pod, answer in zip(pods, answers, strict=True):
        if answer is None:
            is_ready = _pod_ready(pod)
            answer = {"ready": is_ready, "phase": "Ready" if is_ready else "Loading", "probeOnly": True}
        out.append(answer)
    return out


def _record(
    writer: StatusWriter,
    runtime: Runtime,
    body: Mapping[str, Any],
    plan: RolloutPlan,
    revision: str,
    now: datetime,
) -> list[dict[str, Any]]:
    previous = list((writer.fields.get("rollout") or {}).get("history") or [])
    decision = plan.decision
    if decision is None:
        return previous
    entry = {
        "time": rfc3339(now),
        "revision": revision,
        "decision": history_action(decision),
        "step": decision.step,
        # The effective weight while it runs; 100 once complete, 0 after a rollback.
        "weight": decision.weight if decision.action in ("complete", "rollback") else plan.split.weight,
        "reason": decision.reason,
        "message": decision.message[:1024],
    }
    last = previous[-1] if previous else None
    if last and all(last.get(k) == entry[k] for k in ("revision", "decision", "step", "reason")):
        return previous  # the same inconclusive wait again: one entry and one Event per decision
    runtime.spawn(
        runtime.client.post_event(
            body,
            type_="Warning" if decision.action == "rollback" else "Normal",
            reason=decision.reason,
            message=decision.message,
        )
    )
    return [*previous, entry][-MAX_HISTORY:]


async def _reconcile(
    runtime: Runtime, key: ObjectKey, md: ModelDeployment, writer: StatusWriter, now: datetime
) -> float | None:
    model = await _resolve_model(runtime, md)
    if isinstance(model, ModelWait):
        _not_served(writer, model)
        await writer.commit()
        return None if model.terminal else WAITING_REQUEUE_SECONDS
    try:
        revision = build_revision(md, model, runtime.config)
    except ServingBuildError as exc:
        _not_served(writer, ModelWait("InvalidSpec", str(exc), terminal=True))
        await writer.commit()
        return None
    namespace = key.namespace
    stable_body = await runtime.client.get(
        "apps/v1", "Deployment", server_deployment_name(md, STABLE), namespace
    )
    canary_body = await runtime.client.get(
        "apps/v1", "Deployment", server_deployment_name(md, CANARY), namespace
    )
    stable, canary = _observe(stable_body), _observe(canary_body)
    features = await _features(runtime)
    memory = _memory_of(md.status.rollout)
    rollout = md.spec.rollout
    steps = tuple(Step(s.weight, s.pause_seconds) for s in rollout.canary.steps) if rollout.canary else ()
    timeout = rollout.canary.analysis.inconclusive_timeout_seconds if rollout.canary else 0
    health = await _health(runtime, md, revision.name)
    judgement, sample = None, None
    if needs_analysis(memory, revision.name, rollout.strategy) and memory.step_started_at is not None:
        failure = next(
            (str(h.get("message") or h.get("reason")) for h in health if h.get("phase") == "Failed"), None
        )
        judgement, sample = await _analyse(runtime, key, md, memory, canary, now, failure)
    plan = plan_rollout(
        desired=revision.name,
        strategy=rollout.strategy,
        steps=steps,
        inconclusive_timeout_seconds=timeout,
        stable=stable,
        memory=memory,
        judgement=judgement,
        now=now,
        routed=routed(md, features),
    )
    _keep_baseline(runtime, key, plan, sample)
    if md.spec.auth.enabled and md.spec.auth.api_key_secret_ref is None:
        await _ensure_api_keys(runtime, md)
    serving = ServingPlan(
        stable=revision if plan.apply_stable else None,
        stable_replicas=None if md.spec.autoscaling else md.spec.fixed_replicas,
        canary=revision if plan.canary else None,
        canary_replicas=plan.split.canary_replicas,
        canary_weight=plan.split.weight,
    )
    await _apply(runtime, md, build_serving_children(md, serving, features, runtime.config))
    await _delete_dropped(runtime, md, plan, stable_body, revision, canary_exists=canary_body is not None)

    if plan.apply_stable and stable is not None and stable.revision != revision.name:
        health = await _health(runtime, md, revision.name)  # the first pods of a just-applied revision
    model_value = model_ready(None, health)
    values = {
        CONDITION_MODEL_READY: model_value,
        CONDITION_AVAILABLE: available(stable, canary if plan.canary else None),
        CONDITION_PROGRESSING: progressing(plan, stable, None),
        CONDITION_DEGRADED: degraded(plan, stable, None, model_value),
    }
    values[CONDITION_READY] = ready(values)
    for type_, (status, reason, message) in values.items():
        writer.set(type_, status, reason, message)

    history = _record(writer, runtime, writer.body, plan, revision.name, now)
    rollout_status: dict[str, Any] = {
        "stableRevision": plan.memory.stable_revision,
        "step": plan.memory.step,
        "weight": plan.split.weight if plan.canary else 0,
        "history": history,
    }
    if plan.memory.canary_revision and plan.canary:
        rollout_status["canaryRevision"] = plan.memory.canary_revision
    if plan.memory.failed_revision:
        rollout_status["failedRevision"] = plan.memory.failed_revision
    if plan.memory.step_started_at and plan.canary:
        rollout_status["stepStartedAt"] = rfc3339(plan.memory.step_started_at)
    previous_analysis = (writer.fields.get("rollout") or {}).get("analysis")
    if judgement is not None:
        rollout_status["analysis"] = {
            "verdict": judgement.verdict,
            "requests": judgement.requests,
            "errors": judgement.errors,
            **({"errorRate": judgement.error_rate} if judgement.error_rate is not None else {}),
            **({"p95LatencyMs": judgement.p95_latency_ms} if judgement.p95_latency_ms is not None else {}),
            "message": judgement.message,
            "checkedAt": rfc3339(now),
        }
    elif previous_analysis and (plan.canary or plan.phase == "RolledBack"):
        # A running canary's last reading; after a rollback, the reading that failed it, for as long as the
        # spec still asks for the rolled-back revision.
        rollout_status["analysis"] = previous_analysis
    writer.fields["rollout"] = null_dropped_keys(writer.original.get("rollout"), rollout_status)
    writer.fields["endpoint"] = endpoint(md)
    if md.spec.auth.enabled:
        writer.fields["apiKeySecret"] = api_keys_secret_name(md)
    writer.fields["model"] = null_dropped_keys(writer.original.get("model"), model.to_k8s())
    replicas = (stable.replicas if stable else 0) + (canary.replicas if canary and plan.canary else 0)
    writer.fields["replicas"] = replicas
    writer.fields["readyReplicas"] = (stable.ready_replicas if stable else 0) + (
        canary.ready_replicas if canary and plan.canary else 0
    )
    revisions = list(writer.fields.get("revisions") or [])
    if not any(r.get("name") == revision.name for r in revisions):
        revisions.append({"name": revision.name, "modelUri": revision.model_uri, "createdAt": rfc3339(now)})
    writer.fields["revisions"] = revisions[-MAX_HISTORY:]
    gates = _gate_results(health)
    for step in ("quantization", "pruning"):
        if step in gates:
            writer.fields[step] = null_dropped_keys(writer.original.get(step), gates[step])
    await writer.commit()
    return _requeue(md, plan, values)


def null_dropped_keys(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """`new` for a JSON merge patch over `previous`: a key of `previous` that `new` no longer has is sent as
    null, so the patch removes it (a merge patch keeps every key it doesn't name: without this a completed
    canary's `canaryRevision` and `stepStartedAt` would stay in status). Nested objects alike; a key that
    is already gone is not sent again, so an unchanged status is no change."""
    out: dict[str, Any] = dict(new)
    for key, old in (previous or {}).items():
        if key not in out:
            out[key] = None
        elif isinstance(old, Mapping) and isinstance(out[key], Mapping):
            out[key] = null_dropped_keys(old, out[key])
    return out


def _requeue(
    md: ModelDeployment, plan: RolloutPlan, values: Mapping[str, tuple[bool, str, str]]
) -> float | None:
    if plan.canary and md.spec.rollout.canary is not None:
        return float(md.spec.rollout.canary.analysis.interval_seconds)
    if not values[CONDITION_READY][0] and not values[CONDITION_DEGRADED][0]:
        return PROGRESS_REQUEUE_SECONDS
    return None


__all__ = ["null_dropped_keys", "reconcile_modeldeployment"]
