"""The typed view of kopf's indexes: a missing index is an error naming it, never an empty list."""

from __future__ import annotations

import pytest

from finetune_operator.handlers.indexes import FINETUNEJOBS, TRAINER_JOBS, TRAINER_PODS, KopfIndexes


def test_kopf_indexes_refuse_a_missing_index_by_its_id() -> None:
    with pytest.raises(LookupError, match=f"kopf passed no index {TRAINER_PODS}, {FINETUNEJOBS}"):
        KopfIndexes({TRAINER_JOBS: {}})
    indexes = KopfIndexes({TRAINER_JOBS: {}, TRAINER_PODS: {"ns/a": ["pod"]}, FINETUNEJOBS: {}})
    assert indexes.trainer_pods("ns/a") == ["pod"]
    assert indexes.trainer_jobs("ns/a") == []
    assert indexes.finetunejobs() == []
