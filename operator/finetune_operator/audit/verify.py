"""Verify an audit chain and name the first bad record. Pure: takes the files' lines, returns a result.

What each break looks like (record i at file F, line L):
- edited: its `hash` does not match its content, or it is not a record at all; or its hash was
  recomputed after the edit, and then the next record's `prev` no longer matches it (named: record i);
- dropped: `seq` jumps forward and the missing numbers appear nowhere in the files;
- reordered: `seq` jumps forward or back and the missing numbers appear elsewhere in the files;
- duplicated: a `seq` seen before comes again;
- bad signature: a checkpoint whose Ed25519 signature does not verify (only with a public key).

A chain must start at `seq` 0 (prev = 64 zeros) unless `allow_partial_start` is set: after retention
removed the oldest files, the first remaining record's `prev` has to be taken on trust.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from finetune_operator.audit.chain import checkpoint_valid
from finetune_operator.audit.records import GENESIS, AuditRecord, content_hash

ProblemKind = Literal["edited", "dropped", "reordered", "duplicated", "bad-signature"]


@dataclass(frozen=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    where: Location
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.message}"


@dataclass
class VerifyResult:
    records: int = 0
    checkpoints_signed: int = 0
    checkpoints_unsigned: int = 0
    checkpoints_unchecked: int = 0
    """Signed checkpoints whose signature was not checked (no public key given)."""
    first_seq: int | None = None
    last_seq: int | None = None
    problem: Problem | None = None
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class _Line:
    where: Location
    text: str


def _numbered(files: Sequence[tuple[str, Iterable[str]]]) -> list[_Line]:
    out: list[_Line] = []
    for name, lines in files:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                out.append(_Line(Location(name, number), text.rstrip("\n")))
    return out


def _seq_of(text: str) -> int | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if isinstance(seq, int) else None


def verify_chain(
    files: Sequence[tuple[str, Iterable[str]]],
    *,
    public_key: Ed25519PublicKey | None = None,
    allow_partial_start: bool = False,
) -> VerifyResult:
    """`files`: (name, lines) in chain order (rotated files sort by name: audit-000001.jsonl, ...)."""
    lines = _numbered(files)
    result = VerifyResult(files=[name for name, _ in files])
    all_seqs = {seq for seq in (_seq_of(line.text) for line in lines) if seq is not None}
    seen: set[int] = set()
    previous: tuple[AuditRecord, Location] | None = None

    def fail(kind: ProblemKind, where: Location, message: str) -> VerifyResult:
        result.problem = Problem(kind, where, message)
        return result

    for line in lines:
        try:
            raw = json.loads(line.text)
            record = AuditRecord.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            reason = str(exc).splitlines()[0]
            return fail("edited", line.where, f"not an audit record ({reason})")
        # The hash is over the bytes as read, not over a re-serialisation (which could normalise an edit).
        if content_hash(raw) != record.hash:
            return fail("edited", line.where, f"record seq {record.seq}: its content does not match its hash")
        if previous is None:
            if not allow_partial_start and (record.seq != 0 or record.prev != GENESIS):
                return fail(
                    "dropped",
                    line.where,
                    f"the chain starts at seq {record.seq}: records 0..{record.seq - 1} are missing "
                    "(pass --partial if retention removed the oldest files)",
                )
            result.first_seq = record.seq
        else:
            last, last_where = previous
            expected = last.seq + 1
            if record.seq in seen:
                return fail("duplicated", line.where, f"record seq {record.seq} appears a second time")
            if record.seq != expected:
                missing = range(expected, record.seq) if record.seq > expected else range(0)
                if record.seq < expected or any(seq in all_seqs for seq in missing):
                    return fail(
                        "reordered",
                        line.where,
                        f"record seq {record.seq} follows seq {last.seq} (expected {expected})",
                    )
                return fail(
                    "dropped",
                    line.where,
                    f"records seq {expected}..{record.seq - 1} are missing before this one",
                )
            if record.prev != last.hash:
                return fail(
                    "edited",
                    last_where,
                    f"record seq {last.seq} was changed and its hash recomputed: record seq {record.seq} "
                    f"at {line.where} links to a different one",
                )
        if record.checkpoint is not None:
            if record.checkpoint.alg == "none":
                result.checkpoints_unsigned += 1
            elif public_key is not None:
                if not checkpoint_valid(record, public_key):
                    return fail("bad-signature", line.where, f"checkpoint seq {record.seq}: bad signature")
                result.checkpoints_signed += 1
            else:
                result.checkpoints_unchecked += 1
        seen.add(record.seq)
        previous = (record, line.where)
        result.records += 1
        result.last_seq = record.seq
    return result
