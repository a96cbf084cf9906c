"""`python -m finetune_operator` as a process against a cluster, and the small waiting helpers it needs:
shared by the demo (hack/demo.py) and the tests (tests/kube_helpers.py re-exports them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from hack.devcluster.processes import free_port

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 60.0,
    message: str = "condition",
    interval: float = 0.5,
) -> T:
    """Poll `predicate` until it returns something truthy and return that; fail after `timeout` seconds.

    The timeout is a deadline for a condition that should come about, not a measurement.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {message}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET `url` on loopback (no proxy): True on 200, False while nothing (or an error) answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """End a process this test started: SIGTERM, then SIGKILL after `timeout`. Its exit code (None: never
    started)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class OperatorProcess:
    """`python -m finetune_operator` as a subprocess against the test cluster, watching one namespace."""

    def __init__(
        self, namespace: str, kubeconfig: Path, log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.namespace = namespace
        self.env = dict(env or {})
        """Extra environment (operator settings, `FTO_*`)."""
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _healthy(self) -> bool:
        if not self.running:
            raise AssertionError(
                f"the operator exited ({self._exit_code()}) before it was healthy:\n{self.logs()}"
            )
        return http_ok(self.health_url)

    def _exit_code(self) -> int | None:
        return self.process.returncode if self.process else None

    def start(self, timeout: float = 90.0) -> None:
        """Start it (again) and wait until its liveness endpoint answers."""
        if self.running:
            return
        env = {**os.environ, **self.env}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image" / "src"), env.get("PYTHONPATH", "")]
        )
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        cmd = [
            sys.executable,
            "-m",
            "finetune_operator",
            "--namespace",
            self.namespace,
            "--health-port",
            str(self.health_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        wait_for(self._healthy, timeout, f"the operator's {self.health_url}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (kopf finishes its handlers), then SIGKILL after `timeout`. Returns the exit code."""
        return terminate(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: the operator dies mid-work, as in a node failure."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
