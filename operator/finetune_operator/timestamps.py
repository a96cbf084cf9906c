"""RFC 3339 timestamps as Kubernetes writes them (`2026-01-01T00:00:00Z`): the one parser and formatter."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC to the second, with a `Z` (metav1.Time's wire format)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def parse_rfc3339(value: object) -> datetime | None:
    """A timestamp from the API (`...Z` or with an offset) as an aware datetime; None for empty/None."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
