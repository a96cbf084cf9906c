"""A test that cannot run pods fails under CI=true (set by CI) and skips with the reason elsewhere
(tests/kube_helpers.py::cannot_run_pods, used by the `local_node` fixture)."""

from __future__ import annotations

import pytest

from tests.kube_helpers import cannot_run_pods


def test_under_ci_a_test_that_cannot_run_pods_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run pods on this machine: no netns here"):
        cannot_run_pods("no netns here")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_elsewhere_it_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="cannot run pods on this machine: no netns here"):
        cannot_run_pods("no netns here")
