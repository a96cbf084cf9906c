"""The malformed-row log and the bad-row ratio check."""

from __future__ import annotations

from finetune_trainer.data.errors import DataError
from finetune_trainer.data.report import BAD_LINES_KEPT, BadLine, BadRowsRecord

__all__ = ["BadRowLog"]

_NAMED_IN_ERROR = 5


class BadRowLog:
    """Counts every malformed row and keeps the first :data:`BAD_LINES_KEPT` with file and line."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.lines: list[BadLine] = []

    def row_read(self) -> None:
        self.total += 1

    def bad(self, source: str, line: int, reason: str) -> None:
        self.count += 1
        if len(self.lines) < BAD_LINES_KEPT:
            self.lines.append(BadLine(source=source, line=line, reason=reason))

    @property
    def ratio(self) -> float:
        return self.count / self.total if self.total else 0.0

    def record(self, max_ratio: float) -> BadRowsRecord:
        return BadRowsRecord(
            count=self.count, total=self.total, ratio=self.ratio, max_ratio=max_ratio, lines=list(self.lines)
        )

    def check(self, max_ratio: float) -> None:
        """Raise :class:`DataError` when the malformed fraction exceeds ``max_ratio``."""
        if self.total == 0:
            raise DataError("the data sources contain no rows", reason="EmptyDataset")
        if self.ratio <= max_ratio:
            return
        named = "; ".join(f"{b.source}:{b.line}: {b.reason}" for b in self.lines[:_NAMED_IN_ERROR])
        more = f" (and {self.count - _NAMED_IN_ERROR} more)" if self.count > _NAMED_IN_ERROR else ""
        raise DataError(
            f"{self.count} of {self.total} rows are malformed ({self.ratio:.2%} > badRows.maxRatio "
            f"{max_ratio:.2%}). First bad rows: {named}{more}. Full list in data_report.json.",
            reason="TooManyBadRows",
        )
