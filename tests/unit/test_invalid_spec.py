"""The TTL of a FineTuneJob whose spec the typed model refuses: read from its `scheduling` section alone, so
that an invalid job goes after its TTL like any failed job (tests/cluster/test_invalid_spec.py runs the whole
ending against the dev cluster); no TTL when that section is itself invalid."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.controllers.finetunejob import _declared_ttl


def invalid_job(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "a"}, "spec": {"task": "telepathy", **spec}}


@pytest.mark.parametrize(
    ("scheduling", "ttl"),
    [({"ttlSecondsAfterFinished": 0}, 0), ({"ttlSecondsAfterFinished": 600}, 600), ({}, None)],
)
def test_the_ttl_of_an_invalid_job_is_read_from_its_scheduling_section(
    scheduling: dict[str, Any], ttl: int | None
) -> None:
    assert _declared_ttl(invalid_job(scheduling=scheduling)) == ttl


def test_an_invalid_job_without_a_scheduling_section_has_no_ttl() -> None:
    assert _declared_ttl(invalid_job()) is None
    assert _declared_ttl({"metadata": {"name": "a"}}) is None


@pytest.mark.parametrize(
    "scheduling", [{"ttlSecondsAfterFinished": -1}, {"ttlSecondsAfterFinished": 0, "unknownField": 1}]
)
def test_without_a_valid_scheduling_section_there_is_no_ttl(scheduling: dict[str, Any]) -> None:
    assert _declared_ttl(invalid_job(scheduling=scheduling)) is None
