"""Pod status as a kubelet reports it, built from what the agent knows (pure functions)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The conditions the node agent owns; others (PodScheduled, DisruptionTarget...) are left to their writers.
OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def timestamp(when: float | None = None) -> str:
    moment = (
        datetime.datetime.now(datetime.UTC)
        if when is None
        else datetime.datetime.fromtimestamp(when, datetime.UTC)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerView:
    """What is known of one container right now."""

    name: str
    image: str
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    container_id: str = ""

    def running(self) -> bool:
        return "running" in self.state

    def terminated(self) -> dict[str, Any] | None:
        value = self.state.get("terminated")
        return dict(value) if value is not None else None


def terminated_state(exit_code: int, started_at: str, finished_at: str, message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": finished_at,
    }
    if message:
        state["message"] = message
    return {"terminated": state}


def container_status(view: ContainerView) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": view.name,
        "image": view.image,
        "imageID": "",
        "restartCount": view.restart_count,
        "ready": view.ready,
        "started": view.started,
        "state": view.state,
        "lastState": view.last_state,
    }
    if view.container_id:
        status["containerID"] = view.container_id
    return status


def conditions(
    existing: Sequence[Mapping[str, Any]], wanted: Mapping[str, bool], now: str
) -> list[dict[str, Any]]:
    """Our conditions set to `wanted` (lastTransitionTime kept while a status does not change)."""
    by_type = {c["type"]: dict(c) for c in existing}
    for kind, value in wanted.items():
        status = "True" if value else "False"
        old = by_type.get(kind)
        if old is not None and old.get("status") == status:
            continue
        by_type[kind] = {"type": kind, "status": status, "lastTransitionTime": now, "lastProbeTime": None}
    return [by_type[k] for k in by_type]


def pod_phase(
    restart_policy: str, initialized: bool, views: Sequence[ContainerView], will_restart: bool
) -> str:
    """Pending until the init containers are done and a container has started; Succeeded/Failed once every
    container has terminated for good; Running otherwise."""
    if not initialized:
        return "Pending"
    ended = [v.terminated() for v in views]
    if all(e is not None for e in ended) and not will_restart:
        return "Succeeded" if all(e and e["exitCode"] == 0 for e in ended) else "Failed"
    if any(v.running() or v.terminated() is not None for v in views):
        return "Running"
    return "Pending"
