"""One pod on the local node, from its sandbox to its end: init containers in order, then the containers,
restarted per `restartPolicy` with the kubelet's crash-loop backoff, probed, reported, and stopped on
deletion (SIGTERM, the grace period, SIGKILL, then the pod object is removed, as a kubelet does).

Everything needed to pick a pod up again lives in `pods/<uid>/` under the agent's folder: `pod.json` (slot,
address), and per container `containers/<name>/state.json` (restarts, last state, backoff) next to its run
folder (containers.py). An agent that starts finds the runs still alive and adopts them: never two processes
for one container.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hack.kube import ApiError
from hack.nodeagent import status as st
from hack.nodeagent.containers import ContainerRun
from hack.nodeagent.podenv import (
    VENV_PYTHON,
    ObjectCache,
    PodError,
    container_command,
    container_env,
    hosts_file,
)
from hack.nodeagent.probes import ProbeState, run_probe
from hack.nodeagent.volumes import Volumes, container_mounts

if TYPE_CHECKING:
    from hack.nodeagent.agent import Agent

TICK_S = 0.25
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 300.0
BACKOFF_RESET_S = 600.0
MESSAGE_MAX_BYTES = 4096
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048
STRATEGIC = "application/strategic-merge-patch+json"


@dataclass
class PodRecord:
    namespace: str
    name: str
    uid: str
    slot: int
    ip: str
    finished: bool = False

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pod.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> PodRecord | None:
        try:
            return cls(**json.loads((folder / "pod.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def next_backoff(previous_s: float, lived_s: float) -> float:
    """The kubelet's crash-loop backoff before the next restart: 10 s, doubled after each run, at most 5 min;
    back to 10 s once a run lived longer than 10 min (`previous_s` 0: no backoff so far)."""
    if not previous_s or lived_s > BACKOFF_RESET_S:
        return BACKOFF_BASE_S
    return min(previous_s * 2, BACKOFF_MAX_S)


def termination_message(message_file: Path, log_path: Path, policy: str | None, exit_code: int) -> str:
    """The kubelet's rule: the terminationMessagePath file (at most 4 KiB); when it is empty, the policy is
    FallbackToLogsOnError and the container failed, the end of its log (80 lines, 2 KiB)."""
    try:
        message = message_file.read_bytes()[:MESSAGE_MAX_BYTES].decode(errors="replace").strip()
    except OSError:
        message = ""
    if message or policy != "FallbackToLogsOnError" or exit_code == 0 or not log_path.exists():
        return message
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_FALLBACK_LINES:])
    return tail.encode()[-LOG_FALLBACK_BYTES:].decode(errors="replace").strip()


class ContainerLoop:
    """One container of the pod: its runs, restarts, backoff and probes."""

    def __init__(self, worker: PodWorker, spec: Mapping[str, Any], init: bool) -> None:
        self.worker, self.spec, self.init = worker, spec, init
        self.name = str(spec["name"])
        self.folder = worker.folder / "containers" / self.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.view = st.ContainerView(self.name, str(spec.get("image", "")))
        self.run: ContainerRun | None = None
        self.env: dict[str, str] = {}
        self.done = False  # ended for good (init: succeeded; others: no restart will follow)
        self.handled_pid = 0
        self.backoff_s = 0.0
        self.restart_at = 0.0  # wall clock
        self.probes: dict[str, ProbeState] = {}
        self._load()

    # ------------------------------------------------------------------------------------- persistence

    def _load(self) -> None:
        try:
            saved = json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return
        self.view.restart_count = saved["restart_count"]
        self.view.last_state = saved["last_state"]
        self.view.state = saved["state"]
        self.done, self.handled_pid = saved["done"], saved["handled_pid"]
        self.backoff_s, self.restart_at = saved["backoff_s"], saved["restart_at"]
        run = ContainerRun.adopt(self.folder / "run")
        if run is not None and run.record.pid != self.handled_pid:
            self.run = run
            self.env = saved.get("env", {})
            self._arm_probes(time.monotonic())
            # As it was reported: probes carry on from there (an adopted pod does not drop out of Services).
            self.view.ready, self.view.started = saved.get("ready", False), saved.get("started", False)

    def save(self) -> None:
        saved = {
            "restart_count": self.view.restart_count,
            "last_state": self.view.last_state,
            "state": self.view.state,
            "done": self.done,
            "handled_pid": self.handled_pid,
            "backoff_s": self.backoff_s,
            "restart_at": self.restart_at,
            "env": self.env,
            "ready": self.view.ready,
            "started": self.view.started,
        }
        (self.folder / "state.json").write_text(json.dumps(saved))

    # ------------------------------------------------------------------------------------- runs

    def start(self) -> None:
        worker = self.worker
        pod = worker.with_addresses()
        run_folder = self.folder / "run"
        try:
            self.env = container_env(pod, self.spec, worker.objects(), worker.agent.api_service)
            command = container_command(
                self.spec,
                self.env,
                VENV_PYTHON if VENV_PYTHON.exists() else Path(shutil.which("python3") or ""),
            )
            mounts = container_mounts(self.spec, worker.volume_paths(), self.env)
        except PodError as exc:
            self.view.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            self.restart_at = time.time() + BACKOFF_BASE_S
            return
        run_folder.mkdir(parents=True, exist_ok=True)
        termination_log = run_folder / "termination-log"
        termination_log.write_bytes(b"")
        hosts = worker.folder / "hosts"
        plan = {
            "mounts": [
                *(m.__dict__ for m in mounts),
                {"source": str(hosts), "target": "/etc/hosts", "read_only": True},
                {
                    "source": str(termination_log),
                    "target": self.spec.get("terminationMessagePath", "/dev/termination-log"),
                    "read_only": False,
                },
            ],
            "hostname": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "workingDir": self.spec.get("workingDir", "/"),
            "command": command,
            "env": self.env,
            "ready": self.view.ready,
            "started": self.view.started,
        }
        started_at = st.timestamp()
        log_path = worker.agent.logs.path(pod, self.name, self.view.restart_count)
        self.run = ContainerRun.start(run_folder, worker.netns, plan, log_path, started_at)
        self.view.state = {"running": {"startedAt": started_at}}
        self.view.container_id = f"local://{worker.uid}/{self.name}/{self.view.restart_count}"
        self.view.ready = False
        self.view.started = False
        self._arm_probes(time.monotonic())
        self.save()

    def _arm_probes(self, now: float) -> None:
        self.probes = {
            kind: ProbeState(self.spec[f"{kind}Probe"], now)
            for kind in ("startup", "liveness", "readiness")
            if not self.init and self.spec.get(f"{kind}Probe")
        }

    def _exited(self, code: int) -> None:
        """The run ended: record it and decide whether (and when) it restarts."""
        assert self.run is not None
        run = self.run
        message = termination_message(
            run.folder / "termination-log",
            Path(run.record.log),
            self.spec.get("terminationMessagePolicy"),
            code,
        )
        self.view.state = st.terminated_state(code, run.record.started_at, st.timestamp(), message)
        self.view.ready = False
        self.handled_pid = run.record.pid
        self.run = None
        policy = self.worker.restart_policy
        if self.init and code == 0:
            self.done = True
        elif (policy == "Always" and not self.init) or (policy != "Never" and code != 0):
            lived = time.time() - _parse_time(run.record.started_at)
            self.backoff_s = next_backoff(self.backoff_s, lived)
            self.restart_at = time.time() + self.backoff_s
        else:
            self.done = True
        self.save()

    def will_restart(self) -> bool:
        return not self.done

    def step(self) -> None:
        """Advance by what happened since the last step."""
        if self.done:
            return
        if self.run is not None:
            code = self.run.exit_code()
            if code is not None:
                self._exited(code)
                return
            self._probe()
            return
        if time.time() < self.restart_at:
            if "terminated" in self.view.state:
                self.view.last_state = self.view.state
                self.view.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {self.backoff_s:.0f}s restarting failed container={self.name} "
                        f"pod={self.worker.pod['metadata']['name']}",
                    }
                }
                self.save()
            return
        if "terminated" in self.view.state:
            self.view.last_state = self.view.state
        if self.handled_pid:
            self.view.restart_count += 1
        self.start()

    def _probe(self) -> None:
        before = (self.view.ready, self.view.started)
        self._run_probes()
        if (self.view.ready, self.view.started) != before and self.run is not None:
            self.save()

    def _run_probes(self) -> None:
        assert self.run is not None
        now = time.monotonic()
        startup = self.probes.get("startup")
        if startup is not None and startup.result is not True:
            if startup.due(now):
                verdict = self._run_probe(startup, now)
                if verdict is False:
                    self._kill_for_probe("Startup", startup)
                    return
                if verdict is not True:
                    return
            else:
                return
        self.view.started = True
        liveness = self.probes.get("liveness")
        if liveness is not None and liveness.due(now) and self._run_probe(liveness, now) is False:
            self._kill_for_probe("Liveness", liveness)
            return
        readiness = self.probes.get("readiness")
        if readiness is None:
            self.view.ready = True
        elif readiness.due(now):
            self.view.ready = self._run_probe(readiness, now) is True

    def _run_probe(self, probe: ProbeState, now: float) -> bool | None:
        assert self.run is not None
        ok, message = run_probe(
            probe.probe,
            self.spec,
            self.worker.record.ip,
            self.worker.agent.sockets,
            self.env,
            self.run.init_pid(),
        )
        return probe.record(ok, message, now)

    def _kill_for_probe(self, kind: str, probe: ProbeState) -> None:
        assert self.run is not None
        self.worker.agent.event(
            self.worker.pod, "Unhealthy", f"{kind} probe failed: {probe.last_message}", warning=True
        )
        grace = float(
            probe.probe.get("terminationGracePeriodSeconds")
            or self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30)
        )
        code = self.run.stop(grace)
        self._exited(code)

    def stop(self, grace: float) -> None:
        if self.run is not None:
            code = self.run.stop(grace)
            self._exited(code)
            self.done = True
            self.save()


class PodWorker(threading.Thread):
    """Runs one pod (by uid) until it has ended and its sandbox is gone."""

    def __init__(self, agent: Agent, pod: Mapping[str, Any]) -> None:
        self.agent = agent
        self.uid = str(pod["metadata"]["uid"])
        self.key = (str(pod["metadata"]["namespace"]), str(pod["metadata"]["name"]))
        super().__init__(name=f"pod-{self.key[0]}/{self.key[1]}", daemon=True)
        self.pod: Mapping[str, Any] = pod
        self.folder = agent.pods_dir / self.uid
        self.restart_policy = str(pod["spec"].get("restartPolicy", "Always"))
        self.record: PodRecord = PodRecord(self.key[0], self.key[1], self.uid, 0, "")
        self._objects: ObjectCache | None = None
        self._volumes: Volumes | None = None
        self._volume_paths: dict[str, Path] | None = None
        self.last_status: dict[str, Any] | None = None
        self.started_wall = time.time()
        self.wake = threading.Event()

    def with_addresses(self) -> dict[str, Any]:
        """The pod as its containers see it: with the addresses it was given (the API may not show them
        yet)."""
        addresses = {
            "podIP": self.record.ip,
            "podIPs": [{"ip": self.record.ip}],
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
        }
        return {**self.pod, "status": {**(self.pod.get("status") or {}), **addresses}}

    @property
    def netns(self) -> Path:
        return self.agent.network.netns_path(self.agent.network.pod_netns(self.record.slot))

    def objects(self) -> ObjectCache:
        if self._objects is None:
            self._objects = ObjectCache(self.agent.api, self.key[0])
        return self._objects

    def volume_paths(self) -> dict[str, Path]:
        if self._volume_paths is None:
            self._volumes = Volumes(self.agent.api, self.pod, self.objects(), self.folder)
            self._volume_paths = self._volumes.materialise()
        return self._volume_paths

    # ------------------------------------------------------------------------------------- lifecycle

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.agent.log(f"pod {self.key[0]}/{self.key[1]}: worker failed:\n{traceback.format_exc()}")
            time.sleep(1.0)
        finally:
            self.agent.worker_done(self)

    def latest(self) -> Mapping[str, Any] | None:
        pod = self.agent.pods.get(self.key)
        if pod is None or pod["metadata"]["uid"] != self.uid:
            return None
        return pod

    def _run(self) -> None:
        saved = PodRecord.load(self.folder)
        if saved is not None and saved.finished:
            self._finish_deleted_if_asked()
            return
        self._sandbox(saved)
        loops = [ContainerLoop(self, c, True) for c in self.pod["spec"].get("initContainers", [])]
        mains = [ContainerLoop(self, c, False) for c in self.pod["spec"]["containers"]]
        self._report(loops, mains)
        while True:
            latest = self.latest()
            if latest is None or latest["metadata"].get("deletionTimestamp"):
                self._terminate(loops + mains, latest)
                return
            self.pod = latest
            pending_init = next((c for c in loops if not c.done), None)
            if pending_init is not None:
                pending_init.step()
                if (
                    pending_init.done
                    and pending_init.view.terminated()
                    and (pending_init.view.state["terminated"]["exitCode"] != 0)
                ):
                    for c in mains:  # an init container failed for good: the pod fails
                        c.done = True
                        c.view.state = {"waiting": {"reason": "PodInitializing"}}
            else:
                for c in mains:
                    c.step()
            phase = self._report(loops, mains)
            if phase in ("Succeeded", "Failed"):
                self._ended()
                return
            self.wake.wait(TICK_S)
            self.wake.clear()

    def _sandbox(self, saved: PodRecord | None) -> None:
        network = self.agent.network
        if saved is not None:
            self.record = saved
            if not saved.ip or not network.netns_path(network.pod_netns(saved.slot)).exists():
                self.record = PodRecord(
                    self.key[0], self.key[1], self.uid, saved.slot, network.add_pod(saved.slot)
                )
                self.record.save(self.folder)
        else:
            slot = self.agent.allocate_slot(self.uid)
            self.record = PodRecord(self.key[0], self.key[1], self.uid, slot, network.add_pod(slot))
            self.record.save(self.folder)
        (self.folder / "hosts").write_text(hosts_file(self.pod, self.record.ip))

    def _report(self, inits: list[ContainerLoop], mains: list[ContainerLoop]) -> str:
        initialized = all(c.done and c.view.state.get("terminated", {}).get("exitCode") == 0 for c in inits)
        init_failed = any(
            c.done and c.view.state.get("terminated", {}).get("exitCode", 0) != 0 for c in inits
        )
        views = [c.view for c in mains]
        if init_failed:
            phase = "Failed"
        else:
            phase = st.pod_phase(
                self.restart_policy, initialized, views, any(c.will_restart() for c in mains)
            )
        ready = phase == "Running" and all(v.ready for v in views)
        now = st.timestamp()
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.agent.host_ip,
            "hostIPs": [{"ip": self.agent.host_ip}],
            "podIP": self.record.ip,
            "podIPs": [{"ip": self.record.ip}],
            "startTime": st.timestamp(self.started_wall),
            "containerStatuses": [st.container_status(v) for v in views],
            "conditions": st.conditions(
                (self.pod.get("status") or {}).get("conditions") or [],
                {
                    "PodReadyToStartContainers": True,
                    "Initialized": initialized,
                    "ContainersReady": ready,
                    "Ready": ready,
                },
                now,
            ),
        }
        previous = (self.pod.get("status") or {}).get("startTime")
        if previous:
            status["startTime"] = previous
        if inits:
            status["initContainerStatuses"] = [st.container_status(c.view) for c in inits]
        comparable = {k: v for k, v in status.items() if k != "conditions"}
        comparable["ready"] = [c["status"] for c in status["conditions"] if c["type"] in st.OWN_CONDITIONS]
        if comparable != self.last_status:
            try:
                self.agent.api.patch(
                    f"/api/v1/namespaces/{self.key[0]}/pods/{self.key[1]}/status",
                    {"metadata": {"uid": self.uid}, "status": status},
                    STRATEGIC,
                )
                self.last_status = comparable
            except ApiError as exc:
                self.agent.log(f"pod {self.key[0]}/{self.key[1]}: status not written: {exc}")
        return phase

    def _ended(self) -> None:
        """Every container ended for good: release the sandbox (the logs stay until the pod is deleted)."""
        self._release_sandbox()
        self.record.finished = True
        self.record.save(self.folder)
        self._finish_deleted_if_asked()

    def _finish_deleted_if_asked(self) -> None:
        latest = self.latest()
        if latest is not None and latest["metadata"].get("deletionTimestamp"):
            self._delete_object()
        if latest is None or latest["metadata"].get("deletionTimestamp"):
            self._forget()

    def _terminate(self, containers: list[ContainerLoop], latest: Mapping[str, Any] | None) -> None:
        """Deletion: SIGTERM to every container, SIGKILL after the grace period; then remove the object."""
        meta = (latest or self.pod)["metadata"]
        grace = float(
            meta.get("deletionGracePeriodSeconds")
            if meta.get("deletionGracePeriodSeconds") is not None
            else self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        )
        threads = [
            threading.Thread(target=c.stop, args=(grace,), daemon=True)
            for c in containers
            if c.run is not None
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._release_sandbox()
        if latest is not None:
            self._delete_object()
        self._forget()

    def _delete_object(self) -> None:
        self.agent.api.delete(
            f"/api/v1/namespaces/{self.key[0]}/pods/{self.key[1]}",
            {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
        )

    def _release_sandbox(self) -> None:
        self.agent.network.remove_pod(self.record.slot)
        if self._volumes is None:
            Volumes(self.agent.api, self.pod, self.objects(), self.folder).cleanup()
        else:
            self._volumes.cleanup()

    def _forget(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.agent.logs.remove(self.pod)


def _parse_time(text: str) -> float:
    import datetime

    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
