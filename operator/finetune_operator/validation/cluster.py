"""The cluster state a review needs, and which objects to fetch for it. Pure.

Secrets appear only as their key names: the handler drops the values as soon as it has read a Secret, so
no review, message or audit record can carry one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.common import GPU_PRODUCT_LABEL, InvalidResourceError
from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.api.finetunejob import parse_finetunejob
from finetune_operator.api.modeldeployment import KIND as MODELDEPLOYMENT
from finetune_operator.api.modeldeployment import parse_modeldeployment
from finetune_operator.builders.trainer_config import named_claims
from finetune_operator.scheduling.capacity import gpu_count


@dataclass(frozen=True)
class NodeOffer:
    """A node as the GPU-shape check sees it."""

    name: str
    labels: Mapping[str, str]
    allocatable: Mapping[str, int]

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeOffer:
        meta = node.get("metadata") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        counts = {}
        for resource, value in allocatable.items():
            if "/" in resource:  # extended resources only (GPUs); cpu/memory are not counted here
                try:
                    counts[resource] = gpu_count(value)
                except ValueError:
                    continue
        return cls(name=str(meta.get("name", "")), labels=dict(meta.get("labels") or {}), allocatable=counts)

    @property
    def product(self) -> str | None:
        return self.labels.get(GPU_PRODUCT_LABEL)


@dataclass(frozen=True)
class FineTuneJobFacts:
    task: str
    phase: str | None
    artifact_uri: str | None = None
    """Where the server will read the job's artifact (`status.artifact.claimUri`, else `uri`), once known."""


@dataclass(frozen=True)
class ClusterView:
    namespace: str
    secrets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Secrets found, by name: their key names only."""
    claims: frozenset[str] = frozenset()
    """PersistentVolumeClaims found."""
    finetunejobs: Mapping[str, FineTuneJobFacts] = field(default_factory=dict)
    nodes: tuple[NodeOffer, ...] | None = None
    """All nodes, when the review needs them (None: not looked up)."""


@dataclass(frozen=True)
class Lookups:
    """Objects a review needs from the request's namespace (and whether it needs the nodes)."""

    secrets: tuple[str, ...] = ()
    claims: tuple[str, ...] = ()
    finetunejobs: tuple[str, ...] = ()
    nodes: bool = False


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def lookups(kind: str, body: Mapping[str, Any]) -> Lookups:
    """What to fetch for reviewing `body`; nothing for a body that doesn't parse (it is refused as is)."""
    try:
        if kind == FINETUNEJOB:
            job = parse_finetunejob(body)
            encryption = job.spec.output.encryption_key_secret_ref
            named = [job.spec.credentials_secret, encryption.name if encryption else None]
            return Lookups(
                secrets=_unique([name for name in named if name]),
                claims=_unique([claim for _, claim in named_claims(job)]),
                nodes=job.spec.distributed.gpus_per_node > 0,
            )
        if kind == MODELDEPLOYMENT:
            deployment = parse_modeldeployment(body)
            spec = deployment.spec
            claims = [
                uri.removeprefix("pvc://").split("/", 1)[0]
                for uri in (spec.model.uri, spec.model.base_model)
                if uri and uri.startswith("pvc://")
            ]
            if spec.feedback.storage.existing_claim:
                claims.append(spec.feedback.storage.existing_claim)
            refs = (spec.auth.api_key_secret_ref, spec.model.encryption_key_secret_ref)
            return Lookups(
                secrets=_unique([ref.name for ref in refs if ref]),
                claims=_unique(claims),
                finetunejobs=(spec.model.from_fine_tune_job,) if spec.model.from_fine_tune_job else (),
                nodes=spec.resources.gpus > 0,
            )
    except InvalidResourceError:
        return Lookups()
    raise ValueError(f"no admission review for kind {kind!r}")
