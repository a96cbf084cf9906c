"""The dev cluster's processes: started in their own session, logging to a file, recorded with their start
time, stopped by that record only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hack.devcluster.layout import STATE_VERSION, STOP_GRACE_S, Layout, fail, log


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone (or a zombie).

    Recorded with each PID so that `down` never signals a process that merely reused a PID of ours.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int
    log: str
    args: list[str]

    def alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


@dataclass
class State:
    version: int
    api_port: int
    etcd_port: int
    bin_dir: str
    gpu_nodes: str
    started_by: str
    started_at: float
    processes: list[ProcessRecord] = field(default_factory=list)
    local_node: str = ""
    """The node agent's node, or empty (then `no_local_node` says why)."""
    no_local_node: str = ""

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def save(self, layout: Layout) -> None:
        tmp = layout.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(layout.state_file)

    @classmethod
    def load(cls, layout: Layout) -> State | None:
        try:
            raw = json.loads(layout.state_file.read_text())
        except (OSError, ValueError):
            return None
        if raw.get("version") != STATE_VERSION:
            return None
        processes = [ProcessRecord(**p) for p in raw.pop("processes", [])]
        return cls(**raw, processes=processes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_env(strip_proxies: bool) -> dict[str, str]:
    """This environment with loopback exempt from any proxy (the API and webhooks are on 127.0.0.1).

    Our components reach nothing else, so for them the proxy variables go altogether."""
    env = dict(os.environ)
    if strip_proxies:
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(key, None)
    exempt = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    exempt += [h for h in ("127.0.0.1", "localhost") if h not in exempt]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(exempt)
    return env


def spawn(
    layout: Layout, state: State, name: str, args: list[str], env: dict[str, str] | None = None
) -> ProcessRecord:
    log_path = layout.logs / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**loopback_env(strip_proxies=True), **(env or {})},
            cwd=layout.root,
        )
    ticks = process_start_ticks(proc.pid)
    record = ProcessRecord(name, proc.pid, ticks if ticks is not None else -1, str(log_path), args)
    state.processes.append(record)
    state.save(layout)  # recorded at once, so that `down` can stop it even if `up` fails later
    return record


def stop_processes(records: Sequence[ProcessRecord]) -> int:
    """Stop each live process in reverse start order (clients before the apiserver, the apiserver before
    etcd): SIGTERM, then SIGKILL after a grace period. Returns how many were running."""
    stopped = 0
    for record in reversed(records):
        if not record.alive():
            continue
        stopped += 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        if _wait_gone(record, STOP_GRACE_S):
            continue
        log(f"{record.name} (pid {record.pid}) outlived SIGTERM by {STOP_GRACE_S:.0f}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
        if not _wait_gone(record, 5.0):
            fail(f"could not stop {record.name} (pid {record.pid})")
    return stopped


def _wait_gone(record: ProcessRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while record.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def log_tail(record: ProcessRecord, lines: int = 25) -> str:
    try:
        text = Path(record.log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
