"""reconcile_finetunejob: level-triggered, idempotent; reads actual state and moves the job one step on.

Each call: read the FineTuneJob; apply its children (server-side apply) when its generation changed;
then, from the current attempt's Job and Pods (kopf indexes fed by watches), decide: suspend,
deadline, admission, start, success, failure (non-retryable → Failed at once; retryable → whole-gang
restart with exponential backoff up to maxRestarts), TTL. Status is merge-patched (only the fields the
operator owns; `progress`, `metrics`, `checkpoints`, `artifact` belong to the trainer) and only when it
changed; every phase transition posts an Event. The return value asks for the next reconcile in N s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.api.common import API_VERSION, InvalidResourceError
from finetune_operator.api.conditions import find, is_true
from finetune_operator.api.finetunejob import (
    CONDITION_ADMITTED,
    CONDITION_FAILED,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    KIND,
    FineTuneJob,
    parse_finetunejob,
)
from finetune_operator.api.finetunejob_status import (
    CONDITION_ORDER,
    EXPLAINED_BY,
    REASON_RESTARTING,
    RELEASED_PHASES,
    WARNING_PHASES,
    derive_phase,
    is_terminal,
)
from finetune_operator.builders import build_children, build_trainer_job
from finetune_operator.builders.common import FINALIZER, build_finalizer_intent, checkpoint_claim_name
from finetune_operator.builders.trainer_config import named_claims
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.status import StatusRules, StatusWriter
from finetune_operator.controllers.summaries import (
    JobSummary,
    PodSummary,
    exit_code_from_message,
    of_attempt,
)
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.k8s import ApiError
from finetune_operator.timestamps import parse_rfc3339, rfc3339
from finetune_trainer.config import ConfigError
from finetune_trainer.exit_codes import NON_RETRYABLE, REASONS

logger = logging.getLogger(__name__)

WAITING_FOR = " - waiting for the old gang's pods to go: "
OWNED_STATUS_FIELDS = (
    "phase",
    "observedGeneration",
    "conditions",
    "attempt",
    "restarts",
    "admission",
    "queuedSince",
    "startTime",
    "completionTime",
    "lastFailure",
)
"""Status fields the operator writes; `progress`, `metrics`, `checkpoints`, `artifact` are the trainer's."""
STATUS_RULES = StatusRules(
    owned_fields=OWNED_STATUS_FIELDS,
    condition_order=CONDITION_ORDER,
    derive_phase=derive_phase,
    explained_by=EXPLAINED_BY,
    fallback_condition=CONDITION_ADMITTED,
    warning_phases=WARNING_PHASES,
)


def restart_delay(backoff_seconds: float, restarts: int, max_seconds: float) -> float:
    """Exponential backoff: `backoff_seconds` before the first restart, doubling for each further one."""
    return float(min(max_seconds, backoff_seconds * 2 ** max(0, restarts - 1)))


def fail(writer: StatusWriter, reason: str, message: str) -> None:
    writer.set(CONDITION_FAILED, True, reason, message)
    writer.set(CONDITION_RUNNING, False, reason, message)
    writer.fields["completionTime"] = writer.fields.get("completionTime") or rfc3339(writer.now)


def _record_gauges(runtime: Runtime, ref: str, gpus: int) -> Callable[[Mapping[str, Any]], None]:
    """The writer's commit hook: the job's phase and GPUs (requested while active, admitted) in the gauges."""

    def record(fields: Mapping[str, Any]) -> None:
        phase = str(fields["phase"])
        active = phase not in RELEASED_PHASES
        admitted = active and is_true(fields["conditions"], CONDITION_ADMITTED)
        runtime.gauges.record(ref, phase, gpus if active else 0, gpus if admitted else 0)

    return record


async def reconcile_finetunejob(runtime: Runtime, key: ObjectKey) -> float | None:
    """Reconcile one FineTuneJob; returns seconds until it wants to run again, or None."""
    assert key.kind == KIND, key
    return await _reconcile(runtime, key)


def forget_finetunejob(runtime: Runtime, key: ObjectKey) -> None:
    """The FineTuneJob is gone: free its GPUs and drop everything known about it."""
    runtime.gang.release(key.ref)
    runtime.gang.forget(key.ref)
    runtime.gauges.forget(key.ref)
    runtime.forget(key)


async def _delete_jobs(runtime: Runtime, namespace: str, jobs: Sequence[JobSummary]) -> None:
    await asyncio.gather(
        *(runtime.client.delete("batch/v1", "Job", j.name, namespace) for j in jobs if not j.deleting)
    )


async def _apply_children(runtime: Runtime, job: FineTuneJob, body: dict[str, Any]) -> None:
    async def apply(manifest: dict[str, Any]) -> None:
        try:
            await runtime.client.apply(manifest)
        except ApiError as exc:
            # A bound claim refuses some changes (e.g. a smaller size); the running claim stays valid.
            if manifest["kind"] == "PersistentVolumeClaim" and exc.status == 422:
                logger.warning("checkpoint claim %s not updated: %s", manifest["metadata"]["name"], exc)
                return
            raise

    children = build_children(job, runtime.config)
    await asyncio.gather(*(apply(m) for m in children))
    if runtime.audit is not None:
        names = ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in children)
        runtime.audit.action("ChildrenApplied", body, detail=names)


def _failure(job: JobSummary | None, pods: Sequence[PodSummary]) -> tuple[int | None, str] | None:
    """(exit code, description) of the current attempt's failure, preferring a non-retryable code, then a
    cause (a pod that failed or was disrupted) over its consequences (gang-mates being deleted with the
    Job, the Job's own failure)."""
    found: list[tuple[int | None, str]] = []
    deleted: list[tuple[int | None, str]] = []
    for pod in pods:
        where = f"pod {pod.name} (node rank {pod.rank or '?'}{', on ' + pod.node if pod.node else ''})"
        if pod.failed:
            code = pod.exit_code
            detail = f": {pod.message}" if pod.message else ""
            found.append((code, f"{where} failed with exit code {code}{detail}"))
        elif pod.disrupted:
            found.append((None, f"{where} was disrupted (eviction, preemption or node loss): {pod.message}"))
        elif pod.deleting and not pod.terminated:
            deleted.append((None, f"{where} was deleted while training (eviction or node loss)"))
    found += deleted
    if job is not None and job.failed:
        found.append(
            (exit_code_from_message(job.message), f"Job {job.name} failed ({job.reason}): {job.message}")
        )
    if not found:
        return None
    for code, message in found:
        if code in NON_RETRYABLE:
            return code, message
    return found[0]


async def _reconcile(runtime: Runtime, key: ObjectKey) -> float | None:
    body = await runtime.current_body(key)
    if body is None:
        return None
    finalizers = body["metadata"].get("finalizers") or []
    if body["metadata"].get("deletionTimestamp"):
        # Children go with their owner (ownerReferences + garbage collection); free its GPUs first.
        runtime.gang.release(key.ref)
        await _hold_finalizer(runtime, body, present=False)
        return None
    try:
        job: FineTuneJob | InvalidResourceError = parse_finetunejob(body)
    except InvalidResourceError as exc:
        job = exc
    gpus = job.spec.gpus_total if isinstance(job, FineTuneJob) else 0
    writer = StatusWriter(
        runtime, body, datetime.now(UTC), STATUS_RULES, on_commit=_record_gauges(runtime, key.ref, gpus)
    )
    requeue = await _step(runtime, key, body, job, writer)
    if FINALIZER in finalizers and writer.fields.get("phase") in RELEASED_PHASES:
        await _hold_finalizer(runtime, body, present=False)  # nothing runs any more: nothing to guard
    return requeue


async def _hold_finalizer(runtime: Runtime, body: dict[str, Any], *, present: bool) -> bool:
    """Add (or drop) our finalizer unless it is already so; False if the job is gone meanwhile.

    The finalizer guards GPUs in use, like Kueue's `resource-in-use`: it is added when a gang is about
    to start and dropped once the job is finished or suspended. A job that never runs (queued, created
    suspended, invalid) costs no finalizer write, and its deletion needs no cleanup from us."""
    if (FINALIZER in (body["metadata"].get("finalizers") or [])) == present:
        return True
    try:
        runtime.cache.remember(await runtime.client.apply(build_finalizer_intent(body, present=present)))
    except ApiError as exc:
        if exc.status in (404, 409):  # deleted meanwhile (409: the uid of a deleted object)
            return False
        raise
    return True


async def _start_attempt(
    runtime: Runtime, body: dict[str, Any], job: FineTuneJob, attempt: int, placement: Sequence[str] = ()
) -> None:
    """Create the Job of `attempt`, holding our finalizer first (its pods will hold GPUs)."""
    if await _hold_finalizer(runtime, body, present=True):
        await runtime.client.create(build_trainer_job(job, attempt, runtime.config, placement))


def _placement_status(nodes: Sequence[str], gpus_per_node: int) -> list[dict[str, Any]]:
    """`status.admission.placement`: the node of each rank, in rank order."""
    return [{"rank": rank, "node": node, "gpus": gpus_per_node} for rank, node in enumerate(nodes)]


async def _missing_claims(runtime: Runtime, job: FineTuneJob) -> list[str]:
    """One message per named claim that doesn't exist (yet): the job waits for it, as its pods would."""
    named = named_claims(job)
    if not named:
        return []
    namespace = str(job.metadata["namespace"])
    found = await asyncio.gather(
        *(runtime.client.get("v1", "PersistentVolumeClaim", claim, namespace) for _, claim in named)
    )
    return [
        f"{field}: PersistentVolumeClaim {claim!r} not found in namespace {namespace!r}"
        for (field, claim), body in zip(named, found, strict=True)
        if body is None
    ]


async def _step(
    runtime: Runtime,
    object_key: ObjectKey,
    body: dict[str, Any],
    parsed: FineTuneJob | InvalidResourceError,
    writer: StatusWriter,
) -> float | None:
    """One reconcile step of a live (not deleting) job; returns seconds until the next, or None."""
    key = object_key.ref
    namespace = body["metadata"]["namespace"]
    config, now = runtime.config, writer.now
    status = body.get("status") or {}
    jobs = runtime.observed.trainer_jobs(key)
    pods = runtime.observed.trainer_pods(key)

    if isinstance(parsed, InvalidResourceError):
        if not is_terminal(writer.conditions):
            fail(writer, "InvalidSpec", str(parsed))
            runtime.gang.release(key)
        await writer.commit()
        return None
    job = parsed
    scheduling = job.spec.scheduling

    # --- finished: sticky; only TTL and making sure nothing still runs --------------------------------
    if is_terminal(writer.conditions):
        # A failed Job's controller stops its own pods; failed pods stay for `kubectl logs`. Anything
        # else still running (a deadline, a gang whose Job didn't fail yet) is stopped here.
        live_attempts = {p.attempt for p in pods if not p.terminated and not p.deleting}
        await _delete_jobs(
            runtime, namespace, [j for j in jobs if j.attempt in live_attempts and not j.failed]
        )
        runtime.gang.set_not_admitted(key)
        await writer.commit()
        return await _ttl(runtime, job, writer)

    # --- children --------------------------------------------------------------------------------------
    if not runtime.applied.is_current(object_key, writer.generation):
        try:
            await _apply_children(runtime, job, body)
        except ConfigError as exc:
            fail(writer, REASONS[3], str(exc))
            runtime.gang.release(key)
            await writer.commit()
            return await _ttl(runtime, job, writer)
        runtime.applied.mark(object_key, writer.generation)

    attempt = int(status.get("attempt") or 0)
    restarts = int(status.get("restarts") or 0)
    admitted_condition = is_true(writer.conditions, CONDITION_ADMITTED)

    # --- suspend / resume ------------------------------------------------------------------------------
    if scheduling.suspend:
        await _delete_jobs(runtime, namespace, jobs)
        message = f"suspended: pods deleted, checkpoints kept on claim {checkpoint_claim_name(job)}"
        writer.set(CONDITION_SUSPENDED, True, "Suspended", message)
        writer.set(CONDITION_RUNNING, False, "Suspended", message)
        writer.set(CONDITION_ADMITTED, False, "Suspended", "no GPUs are held or requested while suspended")
        writer.fields["admission"] = None
        writer.fields["queuedSince"] = None
        if admitted_condition or runtime.gang.admitted(key):
            runtime.gang.release(key)
        await writer.commit()
        return None
    if is_true(writer.conditions, CONDITION_SUSPENDED):
        writer.set(
            CONDITION_SUSPENDED,
            False,
            "Resumed",
            "resumed: the next attempt continues from the newest checkpoint",
        )

    # --- deadline --------------------------------------------------------------------------------------
    deadline_in: float | None = None
    start_time = parse_rfc3339(writer.fields.get("startTime"))
    if scheduling.active_deadline_seconds and start_time:
        deadline_in = (
            start_time + timedelta(seconds=scheduling.active_deadline_seconds) - now
        ).total_seconds()
        if deadline_in <= 0:
            await _delete_jobs(runtime, namespace, jobs)
            fail(
                writer,
                "DeadlineExceeded",
                f"running since {rfc3339(start_time)}, longer than activeDeadlineSeconds="
                f"{scheduling.active_deadline_seconds}",
            )
            runtime.gang.release(key)
            await writer.commit()
            return await _ttl(runtime, job, writer)

    # --- admission -------------------------------------------------------------------------------------
    if not admitted_condition and not runtime.gang.admitted(key):
        missing = await _missing_claims(runtime, job)
        if missing:  # its pods would wait in Pending for the claim, saying nothing here
            writer.set(CONDITION_ADMITTED, False, "ClaimNotFound", "; ".join(missing))
            writer.fields["queuedSince"] = writer.fields.get("queuedSince") or rfc3339(now)
            await writer.commit()
            return config.requeue_seconds
    # The Running condition while a gang restart is under way (its lastTransitionTime starts the backoff).
    running = find(writer.conditions, CONDITION_RUNNING)
    restarting = (
        running
        if running and running.get("status") == "False" and running.get("reason") == REASON_RESTARTING
        else None
    )
    if scheduling.queue_name and restarting is None:
        if attempt == 0:
            attempt = 1
            writer.fields["attempt"] = 1
            await writer.commit()
        current = next((j for j in jobs if j.attempt == attempt), None)
        if current is None:
            await _start_attempt(runtime, body, job, attempt)
        if current is None or current.suspended:
            writer.set(
                CONDITION_ADMITTED,
                False,
                "WaitingForKueue",
                f"waiting for Kueue LocalQueue {scheduling.queue_name} to admit the gang",
            )
            writer.fields["queuedSince"] = writer.fields.get("queuedSince") or rfc3339(now)
            await writer.commit()
            return None
        if not admitted_condition:
            writer.set(
                CONDITION_ADMITTED, True, "AdmittedByKueue", f"admitted by Kueue ({scheduling.queue_name})"
            )
            writer.fields["startTime"] = writer.fields.get("startTime") or rfc3339(now)
            writer.fields["queuedSince"] = None
    elif not scheduling.queue_name:
        admitted = runtime.gang.admitted(key, admitted_condition)
        if not admitted:
            decision = await runtime.gang.decide(key)
            if not decision.admitted:
                assert decision.waiting is not None
                writer.set(CONDITION_ADMITTED, False, decision.waiting.reason, decision.waiting.message)
                writer.fields["queuedSince"] = writer.fields.get("queuedSince") or rfc3339(now)
                writer.fields["admission"] = (
                    {"queuePosition": decision.queue_position} if decision.queue_position else None
                )
                await writer.commit()
                return config.requeue_seconds
        if not admitted_condition:
            attempt += 1
            spec = job.spec.distributed
            placement = runtime.gang.placement(key)
            where = f" on {', '.join(placement)}" if placement else ""
            writer.set(
                CONDITION_ADMITTED,
                True,
                "GangAdmitted",
                f"{spec.nodes} {'node' if spec.nodes == 1 else 'nodes'} x {spec.gpus_per_node} GPUs{where}",
            )
            writer.fields["attempt"] = attempt
            writer.fields["admission"] = {
                "admittedAt": rfc3339(now),
                "gpus": spec.nodes * spec.gpus_per_node,
                "placement": _placement_status(placement, spec.gpus_per_node),
            }
            queued_since = parse_rfc3339(writer.fields.get("queuedSince"))
            if queued_since:
                runtime.metrics.time_queued.observe((now - queued_since).total_seconds())
            writer.fields["queuedSince"] = None
            writer.fields["startTime"] = writer.fields.get("startTime") or rfc3339(now)
            writer.set(CONDITION_RUNNING, False, "Starting", f"starting attempt {attempt}")
            await writer.commit()  # the attempt is recorded before its Job exists: a crash can't lose it
            await _start_attempt(runtime, body, job, attempt, placement)
            return deadline_in

    # --- restarting: old gang gone, backoff over → next attempt ----------------------------------------
    if restarting is not None:
        await _delete_jobs(runtime, namespace, [j for j in jobs if j.attempt <= attempt])
        leftovers = [p for p in pods if p.attempt <= attempt]
        if leftovers:
            # Say what the restart waits for: a pod on an unreachable node can stay Terminating for long.
            waiting = ", ".join(sorted(p.name + (f" on {p.node}" if p.node else "") for p in leftovers))
            message = str(restarting.get("message") or "").split(WAITING_FOR)[0]
            writer.set(CONDITION_RUNNING, False, REASON_RESTARTING, f"{message}{WAITING_FOR}{waiting}")
            await writer.commit()
            return 5.0  # pod deletions wake us sooner
        changed_at = parse_rfc3339(restarting.get("lastTransitionTime")) or now
        delay = restart_delay(scheduling.backoff_seconds, restarts, config.restart_backoff_max_seconds)
        wait = (changed_at + timedelta(seconds=delay) - now).total_seconds()
        if wait > 0:
            await writer.commit()
            return wait
        attempt += 1
        writer.fields["attempt"] = attempt
        writer.set(
            CONDITION_RUNNING, False, "Starting", f"starting attempt {attempt} from the newest checkpoint"
        )
        await writer.commit()
        await _start_attempt(runtime, body, job, attempt)
        return deadline_in

    # --- the current attempt ---------------------------------------------------------------------------
    current_job = next((j for j in jobs if j.attempt == attempt), None)
    current_pods = of_attempt(pods, attempt)
    if current_job is None and not current_pods:
        await _start_attempt(runtime, body, job, attempt)
    nodes = job.spec.distributed.nodes

    succeeded_ranks = {p.rank for p in current_pods if p.phase == "Succeeded"}
    if (current_job is not None and current_job.complete) or len(succeeded_ranks) >= nodes:
        writer.set(CONDITION_SUCCEEDED, True, "Completed", f"all {nodes} pods of attempt {attempt} completed")
        writer.set(CONDITION_RUNNING, False, "Completed", "training finished")
        writer.fields["completionTime"] = rfc3339(now)
        runtime.gang.release(key)
        await writer.commit()
        return await _ttl(runtime, job, writer)

    failure = _failure(current_job, current_pods)
    if failure is not None:
        code, description = failure
        if code is not None and code in NON_RETRYABLE:
            fail(writer, REASONS[code], f"{description} (not retried: exit code {code} is non-retryable)")
            writer.fields["lastFailure"] = description
            runtime.gang.release(key)
            await writer.commit()
            return await _ttl(runtime, job, writer)
        if restarts >= scheduling.max_restarts:
            fail(
                writer,
                "BackoffLimitExceeded",
                f"attempt {attempt} failed after {restarts} of {scheduling.max_restarts} restarts: "
                f"{description}",
            )
            writer.fields["lastFailure"] = description
            runtime.gang.release(key)
            await writer.commit()
            return await _ttl(runtime, job, writer)
        restarts += 1
        delay = restart_delay(scheduling.backoff_seconds, restarts, config.restart_backoff_max_seconds)
        writer.fields["restarts"] = restarts
        writer.fields["lastFailure"] = description
        writer.set(
            CONDITION_RUNNING,
            False,
            REASON_RESTARTING,
            f"attempt {attempt} failed: {description}; whole-gang restart {restarts} of "
            f"{scheduling.max_restarts} in {delay:g}s from the newest checkpoint",
        )
        runtime.metrics.restarts.labels(reason="disruption" if code is None else "failure").inc()
        await writer.commit()
        await _delete_jobs(runtime, namespace, [j for j in jobs if j.attempt <= attempt])
        return max(delay, 1.0)

    live = [p for p in current_pods if p.phase in ("Running", "Succeeded") and not p.deleting]
    if len(live) >= nodes:
        placed = ", ".join(sorted({p.node for p in live}))
        writer.set(CONDITION_RUNNING, True, "AllPodsRunning", f"{nodes} of {nodes} pods running on {placed}")
        admission = writer.fields.get("admission")
        if admission:  # where this attempt actually runs (a restart after a node loss lands elsewhere)
            ranked = sorted(live, key=lambda p: int(p.rank) if p.rank.isdigit() else 0)
            actual = _placement_status([p.node for p in ranked], job.spec.distributed.gpus_per_node)
            if admission.get("placement") != actual:
                writer.fields["admission"] = {**admission, "placement": actual}
    else:
        writer.set(
            CONDITION_RUNNING, False, "Starting", f"{len(live)} of {nodes} pods of attempt {attempt} running"
        )
    await writer.commit()
    return deadline_in


async def _ttl(runtime: Runtime, job: FineTuneJob, writer: StatusWriter) -> float | None:
    ttl = job.spec.scheduling.ttl_seconds_after_finished
    finished = parse_rfc3339(writer.fields.get("completionTime"))
    if ttl is None or finished is None:
        return None
    remaining = (finished + timedelta(seconds=ttl) - writer.now).total_seconds()
    if remaining > 0:
        return remaining
    meta = writer.body["metadata"]
    logger.info(
        "%s/%s: deleting, finished %ss ago (ttlSecondsAfterFinished)", meta["namespace"], meta["name"], ttl
    )
    await runtime.client.delete(API_VERSION, KIND, meta["name"], meta["namespace"])
    return None
