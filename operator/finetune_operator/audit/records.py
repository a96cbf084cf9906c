"""Audit records: their shape, their canonical bytes and their hashes. Pure.

A record is one JSON object on one line. Its `hash` is the SHA-256 of the canonical JSON of every other
field (keys sorted, no whitespace, UTF-8), and its `prev` is the `hash` of the record before it, so
editing, dropping or reordering any record breaks a link that `audit verify` can point at.

Records carry digests and field paths, never field values: a spec can name Secrets, and whatever
reaches the audit log is kept for years and copied to log collectors. The only free text is `reason`
(a webhook's refusal message or the controller's transition message), which is about fields, not values
of Secrets (Secrets are referenced by name only; see api/).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GENESIS = "0" * 64
"""`prev` of the first record of a chain."""

RecordType = Literal["admission", "action", "checkpoint"]


class Checkpoint(BaseModel):
    """A signature over the chain head (`prev` of the checkpoint record and its `seq`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    alg: Literal["ed25519", "none"]
    key_id: str = Field(alias="keyId", default="")
    signature: str = ""
    """Hex Ed25519 signature of `signed_message(seq, prev)`; empty when no key is configured."""


class AuditRecord(BaseModel):
    """One audit record. Fields mirror the Kubernetes audit event where they overlap (user, verb...)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    seq: int = Field(ge=0)
    time: str
    """RFC 3339 with microseconds, UTC."""
    type: RecordType
    verb: str
    """Admission: CREATE, UPDATE, DELETE. Action: what the operator did (e.g. ChildCreated, Admitted)."""
    user: str = ""
    groups: tuple[str, ...] = ()
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""
    generation: int | None = None
    spec_digest: str = Field(alias="specDigest", default="")
    changed: tuple[str, ...] = ()
    """Dotted paths of the spec fields that differ between the old and the new object."""
    allowed: bool | None = None
    """Admission decision; None for operator actions."""
    reason: str = ""
    correlation_id: str = Field(alias="correlationId", default="")
    detail: str = ""
    """What an action acted on (e.g. `Job/ns/name`); never a value from a spec or a Secret."""
    checkpoint: Checkpoint | None = None
    prev: str
    hash: str

    def line(self) -> str:
        return canonical_json(self.wire())

    def wire(self) -> dict[str, Any]:
        """The JSON object as written: camelCase keys, every field present (stable hashes)."""
        return self.model_dump(mode="json", by_alias=True)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(wire: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a record's fields other than `hash`."""
    body = {key: value for key, value in wire.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def spec_digest(spec: Mapping[str, Any] | None) -> str:
    """`sha256:<hex>` of the canonical JSON of a spec: shows the spec changed without showing it."""
    if spec is None:
        return ""
    return "sha256:" + hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> tuple[str, ...]:
    """Sorted dotted paths where `old` and `new` differ (lists compared whole, as kubectl diff shows)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        paths: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            paths.extend(changed_paths(old.get(key), new.get(key), f"{prefix}.{key}"))
        return tuple(paths)
    return () if old == new else (prefix,)


def correlation_id(kind: str, namespace: str, name: str, generation: int | None) -> str:
    """Ties admission records and the operator's actions to one generation of one resource."""
    return f"{kind}/{namespace}/{name}@{generation if generation is not None else '-'}"


# Not timestamps.rfc3339 (metav1.Time, whole seconds): a record's time keeps microseconds (MicroTime).
def rfc3339_micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(fields: Mapping[str, Any]) -> AuditRecord:
    """A record from its fields (with `prev`, without `hash`); computes `hash`."""
    draft = AuditRecord.model_validate({**fields, "hash": ""})
    wire = draft.wire()
    return draft.model_copy(update={"hash": content_hash(wire)})


def parse_line(text: str) -> AuditRecord:
    """A record from one line; raises ValueError (pydantic's or json's) when it is not one."""
    return AuditRecord.model_validate_json(text)


def iter_lines(texts: Iterable[str]) -> Iterable[str]:
    return (text.rstrip("\n") for text in texts if text.strip())
