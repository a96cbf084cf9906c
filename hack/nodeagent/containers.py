"""One run of one container: started in the pod's network namespace and private mount/UTS/PID namespaces,
recorded on disk so that an agent that restarts finds it again, stopped the kubelet's way.

A run's folder holds `plan.json` (what init.py sets up), `run.json` (PID and start time of the `nsenter`
process, so that nothing but this process is ever signalled), `exit` (written by the container's init when the
command ends) and `created.json` (mount points it made on this machine). Output goes straight to the log file,
not through the agent, so the container outlives an agent that dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hack.devcluster.processes import process_start_ticks
from hack.nodeagent import init

INIT = Path(init.__file__).resolve()
KILLED_EXIT = 128 + signal.SIGKILL


@dataclass
class RunRecord:
    pid: int
    start_ticks: int
    started_at: str
    log: str


def _child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


class ContainerRun:
    """A started (or adopted) container process."""

    def __init__(self, folder: Path, record: RunRecord, proc: subprocess.Popen[bytes] | None) -> None:
        self.folder = folder
        self.record = record
        self.proc = proc
        self._exit_code: int | None = None

    # ------------------------------------------------------------------------------------- start

    @classmethod
    def start(
        cls,
        folder: Path,
        netns: Path,
        plan: dict[str, Any],
        log_path: Path,
        started_at: str,
    ) -> ContainerRun:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("exit", "created.json"):
            (folder / name).unlink(missing_ok=True)
        plan = {**plan, "exit_file": str(folder / "exit"), "created_file": str(folder / "created.json")}
        (folder / "plan.json").write_text(json.dumps(plan, indent=1))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "nsenter",
            f"--net={netns}",
            "--",
            "unshare",
            "--mount",
            "--uts",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-S",
            str(INIT),
            str(folder / "plan.json"),
        ]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        ticks = process_start_ticks(proc.pid)
        record = RunRecord(proc.pid, ticks if ticks is not None else -1, started_at, str(log_path))
        (folder / "run.json").write_text(json.dumps(asdict(record)))
        return cls(folder, record, proc)

    @classmethod
    def adopt(cls, folder: Path) -> ContainerRun | None:
        """The run recorded in `folder` (by an earlier agent), or None if there is none."""
        try:
            record = RunRecord(**json.loads((folder / "run.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return cls(folder, record, None)

    # ------------------------------------------------------------------------------------- state

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return process_start_ticks(self.record.pid) == self.record.start_ticks

    def exit_code(self) -> int | None:
        """None while it runs; then the command's exit code (137 when it was killed before it could tell)."""
        if self._exit_code is not None:
            return self._exit_code
        if self.alive():
            return None
        try:
            self._exit_code = int((self.folder / "exit").read_text())
        except (OSError, ValueError):
            self._exit_code = KILLED_EXIT
        self.cleanup_mount_points()
        return self._exit_code

    def init_pid(self) -> int | None:
        """The container's PID 1 (init.py), as seen from here: the child of `unshare` (which `nsenter` became
        by exec, keeping the recorded PID)."""
        if not self.alive():
            return None
        return _child(self.record.pid)

    def main_pid(self) -> int | None:
        init_pid = self.init_pid()
        return _child(init_pid) if init_pid is not None else None

    def pids(self) -> list[int]:
        """Every process of this container (for tests and `status`): nsenter, unshare, init, and the rest."""
        if not self.alive():
            return []
        found, todo = [], [self.record.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return found

    # ------------------------------------------------------------------------------------- stop

    def signal_main(self, signum: int) -> None:
        pid = self.main_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the container's init: its PID namespace, and every process in it, ends."""
        pid = self.init_pid()
        with contextlib.suppress(ProcessLookupError):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            elif self.alive():
                os.killpg(self.record.pid, signal.SIGKILL)

    def stop(self, grace: float) -> int:
        """SIGTERM to the command, SIGKILL after `grace` seconds (the kubelet's order); returns the exit
        code."""
        self.signal_main(signal.SIGTERM)
        if not self.wait(grace):
            self.kill()
            if not self.wait(10.0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.record.pid, signal.SIGKILL)
                self.wait(5.0)
        code = self.exit_code()
        return KILLED_EXIT if code is None else code

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def cleanup_mount_points(self) -> None:
        """Mount points the container made, should its init have been killed before removing them."""
        try:
            created = json.loads((self.folder / "created.json").read_text())
        except (OSError, ValueError):
            return
        init.remove_mount_points([str(p) for p in created])
        (self.folder / "created.json").unlink(missing_ok=True)
