"""The node agent's pure parts (hack/nodeagent): pod status as a kubelet reports it, probe thresholds and the
crash-loop backoff. No cluster: real values in, real values out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hack.nodeagent import status as st
from hack.nodeagent.podworker import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    BACKOFF_RESET_S,
    next_backoff,
    termination_message,
)
from hack.nodeagent.probes import ProbeState, resolve_port

STARTED, FINISHED = "2026-01-01T10:00:00Z", "2026-01-01T10:00:05Z"


def view(name: str = "main", state: dict[str, Any] | None = None, **fields: Any) -> st.ContainerView:
    container = st.ContainerView(name, "python:3.11-slim", **fields)
    if state is not None:
        container.state = state
    return container


def running() -> dict[str, Any]:
    return {"running": {"startedAt": STARTED}}


def exited(code: int) -> dict[str, Any]:
    return st.terminated_state(code, STARTED, FINISHED)


# ----------------------------------------------------------------------------------------- container state


def test_a_new_container_is_waiting_in_container_creating_not_ready_not_started() -> None:
    status = st.container_status(view())
    assert status == {
        "name": "main",
        "image": "python:3.11-slim",
        "imageID": "",
        "restartCount": 0,
        "ready": False,
        "started": False,
        "state": {"waiting": {"reason": "ContainerCreating"}},
        "lastState": {},
    }
    assert "containerID" not in status  # the kubelet leaves it out until a container exists


def test_exit_zero_is_completed_and_anything_else_is_error_with_the_code() -> None:
    assert exited(0) == {
        "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": STARTED, "finishedAt": FINISHED}
    }
    assert exited(3)["terminated"]["reason"] == "Error"
    assert exited(3)["terminated"]["exitCode"] == 3
    killed = st.terminated_state(137, STARTED, FINISHED)["terminated"]
    assert (killed["reason"], killed["exitCode"]) == ("Error", 137)


def test_the_termination_message_is_reported_only_when_there_is_one() -> None:
    assert "message" not in exited(1)["terminated"]
    assert st.terminated_state(1, STARTED, FINISHED, "bye")["terminated"]["message"] == "bye"


def test_a_restarted_container_reports_its_count_its_last_run_and_its_id() -> None:
    restarted = view(
        state=running(),
        restart_count=2,
        last_state=exited(3),
        ready=True,
        started=True,
        container_id="local://uid/main/2",
    )
    status = st.container_status(restarted)
    assert status["restartCount"] == 2
    assert status["state"] == running()
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert (status["ready"], status["started"]) == (True, True)
    assert status["containerID"] == "local://uid/main/2"


def test_a_view_knows_whether_it_runs_or_has_ended() -> None:
    assert view(state=running()).running()
    assert view(state=running()).terminated() is None
    ended = view(state=exited(1))
    assert not ended.running()
    assert ended.terminated() == exited(1)["terminated"]
    waiting = view(state={"waiting": {"reason": "CrashLoopBackOff"}})
    assert not waiting.running()
    assert waiting.terminated() is None


def test_the_timestamp_is_rfc3339_in_utc_to_the_second() -> None:
    assert st.timestamp(0) == "1970-01-01T00:00:00Z"
    assert st.timestamp(1767261605.9) == "2026-01-01T10:00:05Z"


# ----------------------------------------------------------------------------------------- conditions


def test_conditions_are_added_with_the_transition_time_and_no_probe_time() -> None:
    result = st.conditions([], {"Initialized": True, "Ready": False}, "T1")
    assert result == [
        {"type": "Initialized", "status": "True", "lastTransitionTime": "T1", "lastProbeTime": None},
        {"type": "Ready", "status": "False", "lastTransitionTime": "T1", "lastProbeTime": None},
    ]


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    first = st.conditions([], {"Ready": False, "ContainersReady": False}, "T1")
    same = st.conditions(first, {"Ready": False, "ContainersReady": False}, "T2")
    assert same == first
    flipped = st.conditions(same, {"Ready": True, "ContainersReady": False}, "T3")
    by_type = {c["type"]: c for c in flipped}
    assert by_type["Ready"] == {
        "type": "Ready",
        "status": "True",
        "lastTransitionTime": "T3",
        "lastProbeTime": None,
    }
    assert by_type["ContainersReady"]["lastTransitionTime"] == "T1"


def test_conditions_of_other_writers_stay_as_they_are_and_in_place() -> None:
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"}
    result = st.conditions([scheduled], {"Ready": True}, "T1")
    assert [c["type"] for c in result] == ["PodScheduled", "Ready"]
    assert result[0] == scheduled
    assert "PodScheduled" not in st.OWN_CONDITIONS


# ----------------------------------------------------------------------------------------- phase


@pytest.mark.parametrize("policy", ["Always", "OnFailure", "Never"])
def test_a_pod_is_pending_until_its_init_containers_are_done(policy: str) -> None:
    assert st.pod_phase(policy, False, [view(state=running())], will_restart=True) == "Pending"


def test_a_pod_whose_containers_have_not_started_is_pending() -> None:
    assert st.pod_phase("Always", True, [view(), view("side")], will_restart=True) == "Pending"


def test_a_pod_with_a_running_or_restarting_container_is_running() -> None:
    assert st.pod_phase("Always", True, [view(state=running()), view("side")], True) == "Running"
    # A container that ended and will be restarted (Always, or OnFailure after a failure) keeps it Running.
    assert st.pod_phase("Always", True, [view(state=exited(0))], will_restart=True) == "Running"
    assert st.pod_phase("OnFailure", True, [view(state=exited(1))], will_restart=True) == "Running"
    # One container ended for good while another still runs.
    assert st.pod_phase("Never", True, [view(state=exited(1)), view("b", running())], False) == "Running"


def test_a_pod_whose_containers_all_ended_for_good_succeeds_only_if_every_one_exited_zero() -> None:
    assert st.pod_phase("Never", True, [view(state=exited(0)), view("b", exited(0))], False) == "Succeeded"
    assert st.pod_phase("OnFailure", True, [view(state=exited(0))], will_restart=False) == "Succeeded"
    assert st.pod_phase("Never", True, [view(state=exited(0)), view("b", exited(2))], False) == "Failed"
    assert st.pod_phase("Never", True, [view(state=exited(143))], will_restart=False) == "Failed"


# ----------------------------------------------------------------------------------------- probes


def probe(**fields: Any) -> dict[str, Any]:
    return {"exec": {"command": ["true"]}, **fields}


def test_a_probe_waits_for_its_initial_delay_then_runs_every_period() -> None:
    state = ProbeState(probe(initialDelaySeconds=5, periodSeconds=2), started=100.0)
    assert not state.due(104.9)
    assert state.due(105.0)
    state.record(True, "", 105.0)
    assert not state.due(106.9)
    assert state.due(107.0)


def test_the_kubelet_defaults_no_delay_a_ten_second_period_three_failures_one_success() -> None:
    state = ProbeState(probe(), started=0.0)
    assert state.due(0.0)
    assert state.record(False, "refused", 0.0) is None
    assert state.next_at == 10.0
    assert state.record(False, "refused", 10.0) is None
    assert state.record(False, "refused", 20.0) is False
    assert state.last_message == "refused"
    assert state.record(True, "", 30.0) is True


def test_a_verdict_needs_that_many_results_in_a_row() -> None:
    state = ProbeState(probe(failureThreshold=2, successThreshold=3, periodSeconds=1), started=0.0)
    assert state.record(False, "x", 1.0) is None
    assert state.record(True, "", 2.0) is None  # a success breaks the run of failures
    assert state.record(False, "x", 3.0) is None
    assert state.record(False, "x", 4.0) is False
    assert state.record(True, "", 5.0) is False  # the verdict holds until the other threshold is crossed
    assert state.record(True, "", 6.0) is False
    assert state.record(True, "", 7.0) is True
    assert state.record(False, "x", 8.0) is True
    assert (state.successes, state.failures) == (0, 1)


def test_a_probe_port_is_a_number_or_the_name_of_a_container_port() -> None:
    spec = {"ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]}
    assert resolve_port(8080, spec) == 8080
    assert resolve_port("8081", spec) == 8081
    assert resolve_port("metrics", spec) == 9090
    with pytest.raises(ValueError, match="no container port named 'grpc'"):
        resolve_port("grpc", spec)


# ----------------------------------------------------------------------------------------- crash-loop backoff


def test_the_backoff_starts_at_ten_seconds_and_doubles_after_each_crash() -> None:
    waits = [next_backoff(0.0, 1.0)]
    for _ in range(4):
        waits.append(next_backoff(waits[-1], 1.0))
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0]
    assert BACKOFF_BASE_S == 10.0


def test_the_backoff_is_capped_at_five_minutes() -> None:
    wait = 0.0
    for _ in range(20):
        wait = next_backoff(wait, 1.0)
    assert wait == BACKOFF_MAX_S == 300.0
    assert next_backoff(160.0, 1.0) == 300.0  # 320 capped


def test_the_backoff_starts_over_after_a_run_that_lived_longer_than_ten_minutes() -> None:
    assert BACKOFF_RESET_S == 600.0
    assert next_backoff(300.0, BACKOFF_RESET_S + 1) == BACKOFF_BASE_S
    assert next_backoff(300.0, BACKOFF_RESET_S - 1) == BACKOFF_MAX_S  # not quite long enough


# ------------------------------------------------------------------------------------- termination message


def test_the_termination_message_is_the_file_at_most_four_kib(tmp_path: Path) -> None:
    message, log = tmp_path / "termination-log", tmp_path / "log"
    log.write_text("log line\n")
    message.write_text("x" * 5000)
    assert termination_message(message, log, None, 1) == "x" * 4096


def test_without_a_message_only_fallback_to_logs_on_error_reads_the_end_of_a_failed_log(
    tmp_path: Path,
) -> None:
    message, log = tmp_path / "termination-log", tmp_path / "log"
    message.write_text("")
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert termination_message(message, log, "File", 1) == ""
    assert termination_message(message, log, "FallbackToLogsOnError", 0) == ""
    tail = termination_message(message, log, "FallbackToLogsOnError", 1)
    assert tail.splitlines() == [f"line {i}" for i in range(20, 100)]  # the last 80 lines
    log.write_text("y" * 3000 + "\n")
    assert termination_message(message, log, "FallbackToLogsOnError", 1) == "y" * 2048
