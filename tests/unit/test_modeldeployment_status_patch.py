"""The ModelDeployment's status is written as a JSON merge patch: what the reconciler no longer reports must
be sent as null, or it stays (a completed canary's revision, a rolled-back step's clock)."""

from __future__ import annotations

from typing import Any

from finetune_operator.controllers.modeldeployment import null_dropped_keys


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies `application/merge-patch+json`."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


COMPLETING = {
    "stableRevision": "a",
    "canaryRevision": "b",
    "step": 1,
    "stepStartedAt": "2026-01-01T00:00:00Z",
    "weight": 50,
    "analysis": {"verdict": "Pass", "requests": 9, "errorRate": 0.0},
    "history": [{"decision": "Completed", "revision": "b"}],
}


def test_a_completed_canary_leaves_no_canary_revision_or_step_clock_behind() -> None:
    done = {"stableRevision": "b", "step": 0, "weight": 0, "history": COMPLETING["history"]}
    patch = null_dropped_keys(COMPLETING, done)
    assert {k for k, v in patch.items() if v is None} == {"canaryRevision", "stepStartedAt", "analysis"}
    assert merge_patch(COMPLETING, patch) == done


def test_nested_keys_that_went_are_removed_and_the_others_kept() -> None:
    new = {**COMPLETING, "analysis": {"verdict": "Inconclusive", "requests": 0}}
    patched = merge_patch(COMPLETING, null_dropped_keys(COMPLETING, new))
    assert patched["analysis"] == {"verdict": "Inconclusive", "requests": 0}


def test_an_unchanged_status_is_no_change_and_nothing_is_nulled_twice() -> None:
    assert null_dropped_keys(COMPLETING, COMPLETING) == COMPLETING
    done = {"stableRevision": "b"}
    assert null_dropped_keys(done, done) == done
    assert null_dropped_keys(None, done) == done
