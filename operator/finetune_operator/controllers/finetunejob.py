"""reconcile_finetunejob: level-triggered, idempotent; reads actual state and moves the job one step on.

Each call reads the FineTuneJob (from the cache) and the current attempt's Job and Pods (kopf indexes fed by
watches), then asks each concern in turn (`CONCERNS`), until one decides: finished (sticky; only the TTL),
children (applied when the generation changed), suspend, deadline, a preemption the gang plan decided,
claims, admission by Kueue or by the operator's gang plan, a gang restart under way, and observing the
current attempt (success; failure → Failed at once when non-retryable, else a whole-gang restart with
exponential backoff up to maxRestarts; running). Each concern returns `Done(requeue)` or None; the
"fail → release the GPUs → commit → TTL" ending is `Step.fail`/`Step.end`. Status goes through the
kind-generic writer with the FineTuneJob's `STATUS_RULES` (only the fields the operator owns; `progress`,
`metrics`, `checkpoints`, `artifact` belong to the trainer). The return value asks for the next reconcile
in N s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.api.common import API_VERSION, InvalidResourceError, parse_resource
from finetune_operator.api.conditions import find, is_true
from finetune_operator.api.finetunejob import (
    CONDITION_ADMITTED,
    CONDITION_FAILED,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    KIND,
    FineTuneJob,
    Scheduling,
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
from finetune_operator.controllers.runtime import Runtime, finetunejob_key
from finetune_operator.controllers.status import StatusRules, StatusWriter
from finetune_operator.controllers.summaries import (
    JobSummary,
    PodSummary,
    exit_code_from_message,
    of_attempt,
)
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.k8s import ApiError
from finetune_operator.scheduling import PREEMPTED
from finetune_operator.timestamps import parse_rfc3339, rfc3339
from finetune_trainer.config import ConfigError
from finetune_trainer.exit_codes import NON_RETRYABLE, REASONS

logger = logging.getLogger(__name__)

WAITING_FOR = " - waiting for the old gang's pods to go: "
NOW_WAITING = " - now: "
"""Between a Preempted condition's cause (kept until the job runs again) and what it waits for now."""
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


def forget_finetunejob(runtime: Runtime, key: ObjectKey) -> None:
    """The FineTuneJob is gone: free its GPUs and drop everything known about it."""
    runtime.gang.release(key.ref)
    runtime.gang.forget(key.ref)
    runtime.gauges.forget(key.ref)
    runtime.forget(key)


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
    # A RoleBinding after its Role: the API server checks the binder holds the Role's rules (escalation
    # check), and under the operator's own (non-admin) role that check fails while the Role is not there yet.
    bindings = [m for m in children if m["kind"] == "RoleBinding"]
    await asyncio.gather(*(apply(m) for m in children if m["kind"] != "RoleBinding"))
    await asyncio.gather(*(apply(m) for m in bindings))
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


async def reconcile_finetunejob(runtime: Runtime, key: ObjectKey) -> float | None:
    """Reconcile one FineTuneJob; returns seconds until it wants to run again, or None."""
    assert key.kind == KIND, key
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


@dataclass(frozen=True)
class Done:
    """A concern decided this reconcile: stop here, and run again in `requeue` seconds (None: on events)."""

    requeue: float | None = None


@dataclass
class Step:
    """What one reconcile of a live, valid FineTuneJob knows; each concern below reads and moves it on."""

    runtime: Runtime
    key: ObjectKey
    body: dict[str, Any]
    job: FineTuneJob
    writer: StatusWriter
    jobs: list[JobSummary]
    """The batch Jobs of every attempt (kopf index)."""
    pods: list[PodSummary]
    """The pods of every attempt (kopf index)."""
    attempt: int
    restarts: int
    admitted: bool
    """The Admitted condition as this reconcile found it."""
    deadline_in: float | None = None
    """Seconds until activeDeadlineSeconds runs out, once the job has started."""

    @property
    def ref(self) -> str:
        return self.key.ref

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def scheduling(self) -> Scheduling:
        return self.job.spec.scheduling

    @property
    def restarting(self) -> dict[str, Any] | None:
        """The Running condition while a gang restart is under way (its lastTransitionTime starts the
        backoff)."""
        running = find(self.writer.conditions, CONDITION_RUNNING)
        if running and running.get("status") == "False" and running.get("reason") == REASON_RESTARTING:
            return running
        return None

    def queued(self) -> None:
        self.writer.fields["queuedSince"] = self.writer.fields.get("queuedSince") or rfc3339(self.writer.now)

    async def delete_jobs(self, jobs: Sequence[JobSummary]) -> None:
        await asyncio.gather(
            *(
                self.runtime.client.delete("batch/v1", "Job", j.name, self.namespace)
                for j in jobs
                if not j.deleting
            )
        )

    async def start_attempt(self, placement: Sequence[str] = ()) -> None:
        """Create the Job of the current attempt, holding our finalizer first (its pods will hold GPUs)."""
        if await _hold_finalizer(self.runtime, self.body, present=True):
            job = build_trainer_job(self.job, self.attempt, self.runtime.config, placement)
            await self.runtime.client.create(job)

    async def end(self) -> Done:
        """The job is finished (its conditions say how): free its GPUs, record it, then only its TTL."""
        return await _end(self.runtime, self.ref, self.writer, self.scheduling.ttl_seconds_after_finished)

    async def fail(self, reason: str, message: str, *, last_failure: str | None = None) -> Done:
        fail(self.writer, reason, message)
        if last_failure is not None:
            self.writer.fields["lastFailure"] = last_failure
        return await self.end()


Concern = Callable[[Step], Awaitable[Done | None]]


async def _step(
    runtime: Runtime,
    key: ObjectKey,
    body: dict[str, Any],
    parsed: FineTuneJob | InvalidResourceError,
    writer: StatusWriter,
) -> float | None:
    """One reconcile of a live (not deleting) job: the first concern that decides ends it; returns seconds
    until the next, or None."""
    if isinstance(parsed, InvalidResourceError):
        ttl_seconds = _declared_ttl(body)
        if is_terminal(writer.conditions):
            await writer.commit()
            return await _ttl(runtime, ttl_seconds, writer)
        fail(writer, "InvalidSpec", str(parsed))
        return (await _end(runtime, key.ref, writer, ttl_seconds)).requeue
    status = body.get("status") or {}
    step = Step(
        runtime=runtime,
        key=key,
        body=body,
        job=parsed,
        writer=writer,
        jobs=runtime.observed.trainer_jobs(key.ref),
        pods=runtime.observed.trainer_pods(key.ref),
        attempt=int(status.get("attempt") or 0),
        restarts=int(status.get("restarts") or 0),
        admitted=is_true(writer.conditions, CONDITION_ADMITTED),
    )
    for concern in CONCERNS:
        done = await concern(step)
        if done is not None:
            return done.requeue
    raise AssertionError("observing the current attempt always decides")


async def finished(step: Step) -> Done | None:
    """Succeeded/Failed is sticky: only the TTL, and making sure nothing still runs."""
    if not is_terminal(step.writer.conditions):
        return None
    # A failed Job's controller stops its own pods; failed pods stay for `kubectl logs`. Anything else
    # still running (a deadline, a gang whose Job didn't fail yet) is stopped here.
    live_attempts = {p.attempt for p in step.pods if not p.terminated and not p.deleting}
    await step.delete_jobs([j for j in step.jobs if j.attempt in live_attempts and not j.failed])
    step.runtime.gang.set_not_admitted(step.ref)
    await step.writer.commit()
    return Done(await _ttl(step.runtime, step.scheduling.ttl_seconds_after_finished, step.writer))


async def children(step: Step) -> Done | None:
    """Apply the children when the generation changed since they were last applied (or never were here)."""
    applied = step.runtime.applied
    if applied.is_current(step.key, step.writer.generation):
        return None
    try:
        await _apply_children(step.runtime, step.job, step.body)
    except ConfigError as exc:
        return await step.fail(REASONS[3], str(exc))
    applied.mark(step.key, step.writer.generation)
    return None


async def suspend(step: Step) -> Done | None:
    """`suspend: true` stops the pods and keeps the checkpoints; resuming lets the next attempt start."""
    writer = step.writer
    if step.scheduling.suspend:
        await step.delete_jobs(step.jobs)
        message = f"suspended: pods deleted, checkpoints kept on claim {checkpoint_claim_name(step.job)}"
        writer.set(CONDITION_SUSPENDED, True, "Suspended", message)
        writer.set(CONDITION_RUNNING, False, "Suspended", message)
        writer.set(CONDITION_ADMITTED, False, "Suspended", "no GPUs are held or requested while suspended")
        writer.fields["admission"] = None
        writer.fields["queuedSince"] = None
        if step.admitted or step.runtime.gang.admitted(step.ref):
            step.runtime.gang.release(step.ref)
        await writer.commit()
        return Done()
    if is_true(writer.conditions, CONDITION_SUSPENDED):
        message = "resumed: the next attempt continues from the newest checkpoint"
        writer.set(CONDITION_SUSPENDED, False, "Resumed", message)
    return None


async def deadline(step: Step) -> Done | None:
    """activeDeadlineSeconds, counted from the first admission (`startTime`)."""
    limit = step.scheduling.active_deadline_seconds
    start_time = parse_rfc3339(step.writer.fields.get("startTime"))
    if not limit or not start_time:
        return None
    step.deadline_in = (start_time + timedelta(seconds=limit) - step.writer.now).total_seconds()
    if step.deadline_in > 0:
        return None
    await step.delete_jobs(step.jobs)
    return await step.fail(
        "DeadlineExceeded",
        f"running since {rfc3339(start_time)}, longer than activeDeadlineSeconds={limit}",
    )


async def preempted(step: Step) -> Done | None:
    """The gang plan preempted this job for a higher-priority one: stop its gang gracefully and queue it.

    Deleting the Job deletes its pods gracefully: the trainer gets SIGTERM, saves a checkpoint and exits
    10 within the pods' grace period. No restart is charged and `attempt` stays; the plan admits it again
    only once no pod of this attempt is left, and the next attempt resumes from the newest checkpoint."""
    runtime, writer = step.runtime, step.writer
    preemption = runtime.gang.preemption(step.ref)
    if preemption is None:
        return None
    await step.delete_jobs(step.jobs)
    writer.set(CONDITION_ADMITTED, False, PREEMPTED, preemption.message)
    writer.set(CONDITION_RUNNING, False, PREEMPTED, preemption.message)
    writer.fields["queuedSince"] = rfc3339(writer.now)
    writer.fields["admission"] = None
    runtime.metrics.preemptions.inc()
    await writer.commit()  # the phase moves to Queued: an Event with the Preempted message
    runtime.gang.preempted(step.ref)
    preemptor = runtime.cache.get(finetunejob_key(preemption.preemptor))
    if preemptor is not None:
        message = (
            f"preempted {step.ref} (priority {step.scheduling.priority}) to make room for this job; it "
            "resumes from its checkpoint when GPUs are free again"
        )
        runtime.spawn(
            runtime.client.post_event(
                preemptor, type_="Normal", reason="PreemptedLowerPriority", message=message
            )
        )
    return Done(runtime.config.requeue_seconds)


async def claims(step: Step) -> Done | None:
    """A job not yet admitted waits for every claim its spec names, as its pods would (silently)."""
    if step.admitted or step.runtime.gang.admitted(step.ref):
        return None
    missing = await _missing_claims(step.runtime, step.job)
    if not missing:
        return None
    step.writer.set(CONDITION_ADMITTED, False, "ClaimNotFound", "; ".join(missing))
    step.queued()
    await step.writer.commit()
    return Done(step.runtime.config.requeue_seconds)


async def admit_by_kueue(step: Step) -> Done | None:
    """With `queueName`, Kueue admits: the Job is created suspended; Admitted follows its `suspend`."""
    queue_name = step.scheduling.queue_name
    if not queue_name or step.restarting is not None:
        return None
    writer = step.writer
    if step.attempt == 0:
        step.attempt = 1
        writer.fields["attempt"] = 1
        await writer.commit()
    current = next((j for j in step.jobs if j.attempt == step.attempt), None)
    if current is None:
        await step.start_attempt()
    if current is None or current.suspended:
        message = f"waiting for Kueue LocalQueue {queue_name} to admit the gang"
        writer.set(CONDITION_ADMITTED, False, "WaitingForKueue", message)
        step.queued()
        await writer.commit()
        return Done()
    if not step.admitted:
        writer.set(CONDITION_ADMITTED, True, "AdmittedByKueue", f"admitted by Kueue ({queue_name})")
        writer.fields["startTime"] = writer.fields.get("startTime") or rfc3339(writer.now)
        writer.fields["queuedSince"] = None
    return None


async def admit_by_plan(step: Step) -> Done | None:
    """Without `queueName`, the operator's own gang admission decides; admitted → the next attempt."""
    if step.scheduling.queue_name:
        return None
    runtime, writer, now = step.runtime, step.writer, step.writer.now
    if not runtime.gang.admitted(step.ref, step.admitted):
        decision = await runtime.gang.decide(step.ref)
        if not decision.admitted:
            assert decision.waiting is not None
            reason, message = decision.waiting.reason, decision.waiting.message
            waiting_since = find(writer.conditions, CONDITION_ADMITTED) or {}
            if waiting_since.get("reason") == PREEMPTED:  # say why it waits until it runs again
                cause = str(waiting_since.get("message") or "").split(NOW_WAITING)[0]
                reason, message = PREEMPTED, f"{cause}{NOW_WAITING}{message}"
            writer.set(CONDITION_ADMITTED, False, reason, message)
            step.queued()
            position = decision.queue_position
            writer.fields["admission"] = {"queuePosition": position} if position else None
            await writer.commit()
            return Done(runtime.config.requeue_seconds)
    if step.admitted:
        return None
    step.attempt += 1
    spec = step.job.spec.distributed
    placement = runtime.gang.placement(step.ref)
    where = f" on {', '.join(placement)}" if placement else ""
    gang = f"{spec.nodes} {'node' if spec.nodes == 1 else 'nodes'} x {spec.gpus_per_node} GPUs{where}"
    writer.set(CONDITION_ADMITTED, True, "GangAdmitted", gang)
    writer.fields["attempt"] = step.attempt
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
    writer.set(CONDITION_RUNNING, False, "Starting", f"starting attempt {step.attempt}")
    await writer.commit()  # the attempt is recorded before its Job exists: a crash can't lose it
    await step.start_attempt(placement)
    return Done(step.deadline_in)


async def restart(step: Step) -> Done | None:
    """A whole-gang restart under way: the old gang gone and the backoff over → the next attempt."""
    restarting = step.restarting
    if restarting is None:
        return None
    writer = step.writer
    await step.delete_jobs([j for j in step.jobs if j.attempt <= step.attempt])
    leftovers = [p for p in step.pods if p.attempt <= step.attempt]
    if leftovers:
        # Say what the restart waits for: a pod on an unreachable node can stay Terminating for long.
        waiting = ", ".join(sorted(p.name + (f" on {p.node}" if p.node else "") for p in leftovers))
        message = str(restarting.get("message") or "").split(WAITING_FOR)[0]
        writer.set(CONDITION_RUNNING, False, REASON_RESTARTING, f"{message}{WAITING_FOR}{waiting}")
        await writer.commit()
        return Done(5.0)  # pod deletions wake us sooner
    changed_at = parse_rfc3339(restarting.get("lastTransitionTime")) or writer.now
    config = step.runtime.config
    delay = restart_delay(step.scheduling.backoff_seconds, step.restarts, config.restart_backoff_max_seconds)
    wait = (changed_at + timedelta(seconds=delay) - writer.now).total_seconds()
    if wait > 0:
        await writer.commit()
        return Done(wait)
    step.attempt += 1
    writer.fields["attempt"] = step.attempt
    message = f"starting attempt {step.attempt} from the newest checkpoint"
    writer.set(CONDITION_RUNNING, False, "Starting", message)
    await writer.commit()
    await step.start_attempt()
    return Done(step.deadline_in)


async def observe_attempt(step: Step) -> Done:
    """The current attempt's Job and pods decide: success, failure (→ Failed or a gang restart), running."""
    writer, attempt = step.writer, step.attempt
    current_job = next((j for j in step.jobs if j.attempt == attempt), None)
    current_pods = of_attempt(step.pods, attempt)
    if current_job is None and not current_pods:
        await step.start_attempt()
    nodes = step.job.spec.distributed.nodes

    succeeded_ranks = {p.rank for p in current_pods if p.phase == "Succeeded"}
    if (current_job is not None and current_job.complete) or len(succeeded_ranks) >= nodes:
        writer.set(CONDITION_SUCCEEDED, True, "Completed", f"all {nodes} pods of attempt {attempt} completed")
        writer.set(CONDITION_RUNNING, False, "Completed", "training finished")
        writer.fields["completionTime"] = rfc3339(writer.now)
        return await step.end()

    failure = _failure(current_job, current_pods)
    if failure is not None:
        return await _failed_attempt(step, *failure)

    live = [p for p in current_pods if p.phase in ("Running", "Succeeded") and not p.deleting]
    if len(live) >= nodes:
        placed = ", ".join(sorted({p.node for p in live}))
        writer.set(CONDITION_RUNNING, True, "AllPodsRunning", f"{nodes} of {nodes} pods running on {placed}")
        admission = writer.fields.get("admission")
        if admission:  # where this attempt actually runs (a restart after a node loss lands elsewhere)
            ranked = sorted(live, key=lambda p: int(p.rank) if p.rank.isdigit() else 0)
            actual = _placement_status([p.node for p in ranked], step.job.spec.distributed.gpus_per_node)
            if admission.get("placement") != actual:
                writer.fields["admission"] = {**admission, "placement": actual}
    else:
        message = f"{len(live)} of {nodes} pods of attempt {attempt} running"
        writer.set(CONDITION_RUNNING, False, "Starting", message)
    await writer.commit()
    return Done(step.deadline_in)


async def _failed_attempt(step: Step, code: int | None, description: str) -> Done:
    """A non-retryable exit fails the job; any other failure restarts the whole gang, up to maxRestarts."""
    scheduling, attempt = step.scheduling, step.attempt
    if code is not None and code in NON_RETRYABLE:
        message = f"{description} (not retried: exit code {code} is non-retryable)"
        return await step.fail(REASONS[code], message, last_failure=description)
    if step.restarts >= scheduling.max_restarts:
        message = (
            f"attempt {attempt} failed after {step.restarts} of {scheduling.max_restarts} restarts: "
            f"{description}"
        )
        return await step.fail("BackoffLimitExceeded", message, last_failure=description)
    restarts = step.restarts + 1
    config = step.runtime.config
    delay = restart_delay(scheduling.backoff_seconds, restarts, config.restart_backoff_max_seconds)
    writer = step.writer
    writer.fields["restarts"] = restarts
    writer.fields["lastFailure"] = description
    writer.set(
        CONDITION_RUNNING,
        False,
        REASON_RESTARTING,
        f"attempt {attempt} failed: {description}; whole-gang restart {restarts} of "
        f"{scheduling.max_restarts} in {delay:g}s from the newest checkpoint",
    )
    step.runtime.metrics.restarts.labels(reason="disruption" if code is None else "failure").inc()
    await writer.commit()
    await step.delete_jobs([j for j in step.jobs if j.attempt <= attempt])
    return Done(max(delay, 1.0))


CONCERNS: tuple[Concern, ...] = (
    finished,
    children,
    suspend,
    deadline,
    preempted,
    claims,
    admit_by_kueue,
    admit_by_plan,
    restart,
    observe_attempt,
)
"""In order; the first that returns `Done` ends the reconcile."""


async def _end(runtime: Runtime, ref: str, writer: StatusWriter, ttl_seconds: int | None) -> Done:
    """Every ending of a job (`Step.end`, and a spec the typed model refuses): free its GPUs, commit the
    status its conditions now say, then only its TTL."""
    runtime.gang.release(ref)
    await writer.commit()
    return Done(await _ttl(runtime, ttl_seconds, writer))


def _declared_ttl(body: Mapping[str, Any]) -> int | None:
    """`ttlSecondsAfterFinished` of a job whose spec the typed model refuses, if its `scheduling` parses
    on its own (an invalid job is a failed job: it goes after its TTL like any other)."""
    try:
        scheduling = parse_resource(Scheduling, KIND, (body.get("spec") or {}).get("scheduling") or {})
    except InvalidResourceError:
        return None
    return scheduling.ttl_seconds_after_finished


async def _ttl(runtime: Runtime, ttl: int | None, writer: StatusWriter) -> float | None:
    """Seconds until the finished job's TTL runs out; at zero it is deleted. None without a TTL."""
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
