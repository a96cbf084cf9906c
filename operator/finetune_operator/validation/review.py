"""What every review shares: the policy, a refusal, the created-by annotation, spec-only changes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from finetune_operator.api.common import InvalidResourceError, SecretKeyRef

CREATED_BY = "finetune.dev/created-by"
"""Annotation the mutating webhook sets on CREATE to the requesting user; it can't change afterwards."""

KNOWN_SCHEMES = ("hf", "pvc", "s3", "file")


class WebhookPolicy(BaseModel):
    """What the operator's settings allow (OperatorConfig's `admission_*` fields)."""

    model_config = ConfigDict(frozen=True)

    allowed_model_schemes: tuple[str, ...] = KNOWN_SCHEMES
    """URI schemes allowed for models (`spec.model.source`, `spec.model.uri`, `spec.model.baseModel`)."""
    allowed_dataset_schemes: tuple[str, ...] = KNOWN_SCHEMES
    """URI schemes allowed for datasets and outputs."""
    check_gpu_shape: bool = True
    """Refuse GPU requests no node can hold. Off for clusters that add GPU nodes on demand."""
    shutdown_timeout_seconds: int = 570
    """Rendered into the trainer config (as the controller does), so the same config is checked."""


@dataclass(frozen=True)
class Refusal:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class Review:
    """Collects refusals; `refuse` keeps the first message per field (the most specific comes first)."""

    refusals: list[Refusal] = field(default_factory=list)

    def refuse(self, field_path: str, message: str) -> None:
        if all(r.field != field_path for r in self.refusals):
            self.refusals.append(Refusal(field_path, message))

    def invalid(self, error: InvalidResourceError) -> None:
        for path, message in error.problems:
            self.refuse(path, message)


T = TypeVar("T")


def run_review(
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    parse: Callable[[Mapping[str, Any]], T],
    checks: Callable[[Review, T], None],
) -> list[Refusal]:
    """The created-by rule always; the rest only when the spec changed (the operator's own metadata
    patches are UPDATEs too) and the body parses (else the parse errors are the refusals)."""
    review = Review()
    check_created_by(review, new, old)
    if not spec_changed(new, old):
        return review.refusals
    try:
        parsed = parse(new)
    except InvalidResourceError as exc:
        review.invalid(exc)
        return review.refusals
    checks(review, parsed)
    return review.refusals


def refusal_text(kind: str, name: str, refusals: Sequence[Refusal]) -> str:
    return f"{kind} {name!r} refused: " + "; ".join(str(r) for r in refusals)


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def check_scheme(review: Review, field_path: str, uri: str | None, allowed: Sequence[str]) -> None:
    if uri is None:
        return
    scheme = scheme_of(uri)
    if scheme not in allowed:
        review.refuse(
            field_path,
            f"scheme {scheme}:// is not allowed by the operator's policy (allowed: "
            + ", ".join(f"{s}://" for s in allowed)
            + ")",
        )


def check_secret_key(
    review: Review,
    field_path: str,
    ref: SecretKeyRef | None,
    secrets: Mapping[str, frozenset[str]],
    namespace: str,
) -> None:
    """`ref` names a Secret of the namespace that has that key (key names only: values are never read)."""
    if ref is None:
        return
    keys = secrets.get(ref.name)
    if keys is None:
        review.refuse(
            f"{field_path}.name",
            f"Secret {ref.name!r} not found in namespace {namespace!r}; create it first or fix the name",
        )
    elif ref.key not in keys:
        listed = ", ".join(sorted(keys)) or "none"
        review.refuse(f"{field_path}.key", f"Secret {ref.name!r} has no key {ref.key!r} (keys: {listed})")


def check_created_by(review: Review, new: Mapping[str, Any], old: Mapping[str, Any] | None) -> None:
    if old is None:
        return
    before = ((old.get("metadata") or {}).get("annotations") or {}).get(CREATED_BY)
    after = ((new.get("metadata") or {}).get("annotations") or {}).get(CREATED_BY)
    if before != after:
        review.refuse(
            f"metadata.annotations[{CREATED_BY}]",
            f"is set at creation to the requesting user ({before!r}) and can't change",
        )


def created_by_patch(body: Mapping[str, Any], username: str) -> list[dict[str, Any]]:
    """JSON patch operations that set the created-by annotation (overwriting what the user sent)."""
    annotations = (body.get("metadata") or {}).get("annotations")
    if annotations is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": {CREATED_BY: username}}]
    key = CREATED_BY.replace("~", "~0").replace("/", "~1")
    return [{"op": "add", "path": f"/metadata/annotations/{key}", "value": username}]


def spec_changed(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    return old is None or new.get("spec") != old.get("spec")
