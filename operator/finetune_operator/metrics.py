"""The operator's Prometheus metrics, served by prometheus-client's own HTTP thread."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PHASES = ("Pending", "Queued", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
_QUEUE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class OperatorMetrics:
    """One registry per operator process (tests may create several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.reconciles = Counter(
            "finetune_operator_reconciles_total",
            "Reconciles by resource kind and result (ok, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "finetune_operator_reconcile_duration_seconds",
            "Duration of one reconcile.",
            ["kind"],
            registry=self.registry,
        )
        self.jobs = Gauge(
            "finetune_operator_finetunejobs", "FineTuneJobs by phase.", ["phase"], registry=self.registry
        )
        self.gpus_requested = Gauge(
            "finetune_operator_gpus_requested",
            "GPUs requested by FineTuneJobs that are not finished.",
            registry=self.registry,
        )
        self.gpus_admitted = Gauge(
            "finetune_operator_gpus_admitted", "GPUs of admitted FineTuneJobs.", registry=self.registry
        )
        self.queue_length = Gauge(
            "finetune_operator_queue_length",
            "FineTuneJobs waiting for admission.",
            registry=self.registry,
        )
        self.time_queued = Histogram(
            "finetune_operator_time_queued_seconds",
            "Time from queued to admitted.",
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.restarts = Counter(
            "finetune_operator_gang_restarts_total",
            "Whole-gang restarts, by cause (failure, suspend-resume is not counted).",
            ["reason"],
            registry=self.registry,
        )
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    @contextmanager
    def time_reconcile(self, kind: str) -> Iterator[None]:
        started = perf_counter()
        result = "error"
        try:
            yield
            result = "ok"
        finally:
            self.reconcile_seconds.labels(kind=kind).observe(perf_counter() - started)
            self.reconciles.labels(kind=kind, result=result).inc()

    def set_phases(self, phase_by_job: Mapping[str, str]) -> None:
        tally = Tally(phase_by_job.values())
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(tally.get(phase, 0))


class FineTuneJobGauges:
    """The last committed phase and GPUs of every FineTuneJob (`namespace/name`), behind the gauges."""

    def __init__(self, metrics: OperatorMetrics) -> None:
        self._metrics = metrics
        self._phases: dict[str, str] = {}
        self._gpus: dict[str, tuple[int, int]] = {}
        """(requested, admitted) GPUs per job."""

    def record(self, job: str, phase: str, requested: int, admitted: int) -> None:
        self._phases[job] = phase
        self._gpus[job] = (requested, admitted)
        self._update()

    def forget(self, job: str) -> None:
        self._phases.pop(job, None)
        self._gpus.pop(job, None)
        self._update()

    def in_phases(self, *phases: str) -> list[str]:
        """The jobs whose last committed phase is one of `phases`."""
        return [job for job, phase in self._phases.items() if phase in phases]

    def _update(self) -> None:
        self._metrics.set_phases(self._phases)
        self._metrics.gpus_requested.set(sum(r for r, _ in self._gpus.values()))
        self._metrics.gpus_admitted.set(sum(a for _, a in self._gpus.values()))
