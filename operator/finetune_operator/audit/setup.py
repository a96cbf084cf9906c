"""The operator's audit log from its settings: which sinks, which key, resumed from the files' tail."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from finetune_operator.api.common import API_VERSION
from finetune_operator.audit.chain import Chain, load_private_key
from finetune_operator.audit.log import AuditLog, AuditMetrics
from finetune_operator.audit.records import AuditRecord
from finetune_operator.audit.sinks import EventSink, RotatingFileSink, Sink, StdoutSink
from finetune_operator.config import OperatorConfig
from finetune_operator.k8s import KubeClient

logger = logging.getLogger(__name__)

EVENT_ACTIONS: frozenset[str] = frozenset()
"""Operator actions the audit log also posts as Events. None: the status writer already posts one per
phase transition; what only the audit log sees are refused admission requests, which always are."""
WARNING_ACTIONS = frozenset({"Restarted", "QualityGateFailed", "RolledBack"})

PostEvent = Callable[[AuditRecord], Coroutine[Any, Any, None]]


def events_poster(client: KubeClient) -> PostEvent:
    """Posts a record as an Event on its resource (a refused CREATE has no uid yet; the Event still
    names the object)."""

    async def post(record: AuditRecord) -> None:
        involved = {
            "apiVersion": API_VERSION,
            "kind": record.kind,
            "metadata": {"name": record.name, "namespace": record.namespace, "uid": record.uid},
        }
        refused = record.type == "admission" and record.allowed is False
        await client.post_event(
            involved,
            type_="Warning" if refused or record.verb in WARNING_ACTIONS else "Normal",
            reason="AdmissionRefused" if refused else record.verb,
            message=record.reason or record.detail or record.verb,
        )

    return post


def start_audit(
    config: OperatorConfig,
    registry: CollectorRegistry,
    client: KubeClient,
    spawn: Callable[[Coroutine[Any, Any, Any]], None],
) -> AuditLog:
    """The audit log and its retry loop (a failing file sink is retried even when nothing is recorded)."""
    log = build_audit_log(config, registry, events_poster(client))

    async def retry_forever() -> None:
        while True:
            await asyncio.sleep(config.audit_retry_seconds)
            log.retry()

    spawn(retry_forever())
    return log


def build_audit_log(
    config: OperatorConfig, registry: CollectorRegistry, post_event: PostEvent | None = None
) -> AuditLog:
    sinks: list[Sink] = []
    if config.audit_stdout:
        sinks.append(StdoutSink())
    tail: AuditRecord | None = None
    if config.audit_dir:
        file_sink = RotatingFileSink(
            Path(config.audit_dir),
            max_bytes=config.audit_max_file_bytes,
            keep_files=config.audit_keep_files,
            retry_seconds=config.audit_retry_seconds,
        )
        tail = file_sink.tail()
        sinks.append(file_sink)
    if post_event is not None:
        sinks.append(EventSink(post_event, actions=EVENT_ACTIONS))
    key = None
    if config.audit_signing_key_file:
        key = load_private_key(Path(config.audit_signing_key_file).read_bytes())
    chain = Chain.resume(tail, signing_key=key, checkpoint_every=config.audit_checkpoint_every)
    log = AuditLog(sinks, chain, metrics=AuditMetrics(registry))
    logger.info(
        "audit log: %s; chain at seq %d; checkpoints %s",
        ", ".join(s.health.name for s in sinks) or "no sinks",
        chain.seq,
        "signed (Ed25519)" if key else "unsigned",
    )
    return log
