"""The one exception of data preparation."""

from __future__ import annotations


class DataError(Exception):
    """The dataset is unusable: too many malformed rows, an empty split, a licence not allowed, an unreadable
    source. The trainer exits with ``ExitCode.DATA_ERROR`` (non-retryable); ``str(err)`` is the message shown
    in the FineTuneJob's Failed condition, so it names the cause (lines, fields, licences)."""

    def __init__(self, message: str, *, reason: str = "InvalidData") -> None:
        super().__init__(message)
        #: Short CamelCase cause, e.g. ``TooManyBadRows``, ``LicenseNotAllowed``, ``EmptySplit``.
        self.reason = reason

    def __reduce__(self) -> tuple[type[DataError], tuple[str], dict[str, str]]:
        # Raised in a preparation worker process, it crosses back pickled: keep the reason.
        return (type(self), (str(self),), {"reason": self.reason})

    @property
    def message(self) -> str:
        return str(self)
