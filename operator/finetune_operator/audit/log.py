"""The audit log: one chain, many sinks. Records for admission requests and for operator actions.

Callers say what happened; this module decides the record's shape (digests, changed paths, the
correlation id) so the callers (webhooks, the controllers' apply and status paths) stay one line each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from finetune_operator.audit.chain import Chain
from finetune_operator.audit.records import AuditRecord, changed_paths, correlation_id, spec_digest
from finetune_operator.audit.sinks import Sink, SinkHealth

CONDITION_AUDIT = "AuditLogHealthy"


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "finetune_operator_audit_records_total",
            "Audit records written, by type.",
            ["type"],
            registry=registry,
        )
        self.sink_up = Gauge(
            "finetune_operator_audit_sink_up",
            "1 while the audit sink takes writes, 0 while it fails.",
            ["sink"],
            registry=registry,
        )
        self.sink_failures = Gauge(
            "finetune_operator_audit_sink_failures",
            "Failed write attempts of the audit sink since start.",
            ["sink"],
            registry=registry,
        )
        self.sink_backlog = Gauge(
            "finetune_operator_audit_sink_backlog",
            "Audit records waiting to be written by the sink.",
            ["sink"],
            registry=registry,
        )
        self.sink_dropped = Gauge(
            "finetune_operator_audit_sink_dropped",
            "Audit records the sink gave up on since start (backlog full).",
            ["sink"],
            registry=registry,
        )

    def observe(self, health: SinkHealth) -> None:
        self.sink_up.labels(sink=health.name).set(1 if health.ok else 0)
        self.sink_failures.labels(sink=health.name).set(health.failures)
        self.sink_backlog.labels(sink=health.name).set(health.backlog)
        self.sink_dropped.labels(sink=health.name).set(health.dropped)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """Thread-safe: admission handlers and controllers may record at the same time."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        chain: Chain | None = None,
        *,
        metrics: AuditMetrics | None = None,
        operator_user: str = "system:finetune-operator",
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.sinks = list(sinks)
        self.chain = chain or Chain()
        self.metrics = metrics
        self.operator_user = operator_user
        self._clock = clock
        self._lock = threading.Lock()
        for sink in self.sinks:
            self._observe(sink)

    def admission(
        self,
        *,
        verb: str,
        user: str,
        groups: Sequence[str],
        kind: str,
        namespace: str,
        name: str,
        uid: str,
        generation: int | None,
        spec: Mapping[str, Any] | None,
        old_spec: Mapping[str, Any] | None,
        allowed: bool,
        reason: str,
    ) -> AuditRecord:
        changed = changed_paths(old_spec or {}, spec or {}) if verb != "DELETE" else ()
        return self.emit(
            {
                "type": "admission",
                "verb": verb,
                "user": user,
                "groups": tuple(groups),
                "kind": kind,
                "namespace": namespace,
                "name": name,
                "uid": uid,
                "generation": generation,
                "specDigest": spec_digest(spec if verb != "DELETE" else old_spec),
                "changed": changed,
                "allowed": allowed,
                "reason": reason,
                "correlationId": correlation_id(kind, namespace, name, generation),
            }
        )

    def action(
        self,
        verb: str,
        resource: Mapping[str, Any],
        *,
        detail: str = "",
        reason: str = "",
    ) -> AuditRecord:
        """An operator action on (or for) `resource`, one of our objects as a dict."""
        meta = resource.get("metadata", {})
        kind = str(resource.get("kind", ""))
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        generation = meta.get("generation")
        return self.emit(
            {
                "type": "action",
                "verb": verb,
                "user": self.operator_user,
                "kind": kind,
                "namespace": namespace,
                "name": name,
                "uid": str(meta.get("uid", "")),
                "generation": generation,
                "specDigest": spec_digest(resource.get("spec")),
                "reason": reason,
                "detail": detail,
                "correlationId": correlation_id(kind, namespace, name, generation),
            }
        )

    def emit(self, fields: Mapping[str, Any]) -> AuditRecord:
        with self._lock:
            record = self._append(fields)
            if self.chain.checkpoint_due():
                self._append_checkpoint()
        return record

    def checkpoint(self) -> AuditRecord:
        with self._lock:
            return self._append_checkpoint()

    def retry(self) -> None:
        with self._lock:
            for sink in self.sinks:
                sink.retry()
                self._observe(sink)

    def close(self) -> None:
        with self._lock:
            if self.chain.since_checkpoint:
                self._append_checkpoint()
            for sink in self.sinks:
                sink.close()

    def health(self) -> list[SinkHealth]:
        return [sink.health for sink in self.sinks]

    def condition(self) -> tuple[bool, str, str]:
        """(status, reason, message) of the `AuditLogHealthy` condition."""
        failing = [health for health in self.health() if not health.ok]
        if not failing:
            return True, "SinksWriting", "every audit sink takes writes"
        message = "; ".join(
            f"{health.name} sink failing ({health.error}); {health.backlog} records held, retried"
            for health in failing
        )
        return False, "SinkFailing", message

    def _append(self, fields: Mapping[str, Any]) -> AuditRecord:
        return self._deliver(self.chain.append(fields, self._clock()))

    def _append_checkpoint(self) -> AuditRecord:
        return self._deliver(self.chain.checkpoint(self._clock()))

    def _deliver(self, record: AuditRecord) -> AuditRecord:
        line = record.line()
        for sink in self.sinks:
            sink.write(record, line)
            self._observe(sink)
        if self.metrics is not None:
            self.metrics.records.labels(type=record.type).inc()
        return record

    def _observe(self, sink: Sink) -> None:
        if self.metrics is not None:
            self.metrics.observe(sink.health)
