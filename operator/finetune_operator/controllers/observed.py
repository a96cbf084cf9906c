"""What the reconcilers may read of the cluster without an API call: the kopf indexes, behind a typed view.

The handlers that fill the indexes (`handlers/indexes.py`) provide the implementation; controllers only see
this protocol, so they never look an index up by a handler's name.
"""

from __future__ import annotations

from typing import Protocol

from finetune_operator.controllers.summaries import FtjSummary, JobSummary, PodSummary


class Observed(Protocol):
    def trainer_jobs(self, owner: str) -> list[JobSummary]:
        """The batch Jobs of the FineTuneJob `owner` (`namespace/name`), every attempt."""
        ...

    def trainer_pods(self, owner: str) -> list[PodSummary]:
        """The Pods of the FineTuneJob `owner` (`namespace/name`), every attempt."""
        ...

    def finetunejobs(self) -> list[FtjSummary]:
        """Every FineTuneJob served, as admission sees it (invalid ones are left out)."""
        ...


class NothingObserved:
    """Before the first handler call hands over kopf's indexes (a reconcile can't run before that)."""

    def trainer_jobs(self, owner: str) -> list[JobSummary]:
        return []

    def trainer_pods(self, owner: str) -> list[PodSummary]:
        return []

    def finetunejobs(self) -> list[FtjSummary]:
        return []
