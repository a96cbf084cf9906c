"""Filter audit records and lay them out as a table. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from finetune_operator.audit.records import AuditRecord


# Not timestamps.parse_rfc3339: this reads what a person types (a bare date, naive = UTC) and says why not.
def parse_time(text: str) -> datetime:
    """ISO 8601 / RFC 3339 (`2026-12-02T18:00:00Z`, or a date); naive times are UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-02T18:00:00Z)") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Query:
    resource: str | None = None
    """`name`, `namespace/name` or `Kind/namespace/name` (kind case-insensitive)."""
    user: str | None = None
    action: str | None = None
    """A verb (CREATE, UPDATE, DELETE) or an operator action (ChildCreated, ...), case-insensitive."""
    since: datetime | None = None
    until: datetime | None = None
    include_checkpoints: bool = False

    def matches(self, record: AuditRecord) -> bool:
        if record.type == "checkpoint" and not self.include_checkpoints:
            return False
        if self.resource is not None and not _resource_matches(self.resource, record):
            return False
        if self.user is not None and record.user != self.user:
            return False
        if self.action is not None and record.verb.lower() != self.action.lower():
            return False
        if self.since is not None or self.until is not None:
            moment = parse_time(record.time)
            if self.since is not None and moment < self.since:
                return False
            if self.until is not None and moment > self.until:
                return False
        return True


def _resource_matches(pattern: str, record: AuditRecord) -> bool:
    parts = pattern.split("/")
    if len(parts) == 1:
        return record.name == parts[0]
    if len(parts) == 2:
        return (record.namespace, record.name) == (parts[0], parts[1])
    if len(parts) == 3:
        return record.kind.lower() == parts[0].lower() and (record.namespace, record.name) == (
            parts[1],
            parts[2],
        )
    raise ValueError(f"--resource {pattern!r}: use NAME, NAMESPACE/NAME or KIND/NAMESPACE/NAME")


def select(records: Iterable[AuditRecord], query: Query) -> Iterator[AuditRecord]:
    return (record for record in records if query.matches(record))


COLUMNS = ("TIME", "SEQ", "TYPE", "USER", "VERB", "RESOURCE", "GEN", "RESULT", "REASON")


def _row(record: AuditRecord) -> tuple[str, ...]:
    resource = "/".join(part for part in (record.kind, record.namespace, record.name) if part)
    result = {True: "allowed", False: "denied", None: ""}[record.allowed]
    return (
        record.time,
        str(record.seq),
        record.type,
        record.user,
        record.verb,
        resource or record.detail,
        "" if record.generation is None else str(record.generation),
        result,
        record.reason.replace("\n", " "),
    )


def table(records: Sequence[AuditRecord]) -> str:
    rows = [COLUMNS, *(_row(record) for record in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
