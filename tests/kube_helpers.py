"""Helpers for tests that talk to a real cluster (the dev cluster, or $KUBECONFIG with
FTO_USE_EXISTING_CLUSTER=1). The fixtures that hand out a `Cluster` live in tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hack import devcluster

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

# kwok ends a Running pod that carries this annotation (hack/kwok/pod-exit.yaml).
EXIT_CODE_ANNOTATION = "kwok.finetune.dev/exit-code"


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; its message includes the command and kubectl's stderr."""

    def __str__(self) -> str:
        return f"`{' '.join(map(str, self.cmd))}` exited {self.returncode}:\n{self.stderr}"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raise KubectlError on a non-zero exit when `check`."""
        cmd = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None) -> None:
        """Create or update objects (server-side apply) from Python dicts."""
        items = manifest if isinstance(manifest, list) else [manifest]
        args = ["apply", "--server-side", "--field-manager=fto-tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    """`kubectl ARGS -o json`, parsed."""
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


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


def get_pod(cluster: Cluster, namespace: str, pod: str) -> dict[str, Any]:
    result: dict[str, Any] = kubectl_json(cluster, "get", "pod", pod, "-n", namespace)
    return result


def wait_for_pod_phase(
    cluster: Cluster, namespace: str, pod: str, phase: str, timeout: float = 60.0
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = get_pod(cluster, namespace, pod)
        return last if last.get("status", {}).get("phase") == phase else None

    try:
        return wait_for(reached, timeout, f"pod {namespace}/{pod} to be {phase}")
    except AssertionError as err:
        raise AssertionError(
            f"{err}; it is {last.get('status', {}).get('phase')}: {last.get('status')}"
        ) from None


def finish_pod(
    cluster: Cluster, namespace: str, pod: str, exit_code: int, timeout: float = 60.0
) -> dict[str, Any]:
    """End a pod on a kwok node as if its containers exited with `exit_code`, and return the pod.

    0 -> phase Succeeded (containers terminated, reason Completed); anything else -> phase Failed with
    containerStatuses[*].state.terminated.exitCode == exit_code (reason Error). The pod must be scheduled
    on a kwok node; kwok acts once it is Running.
    """
    if not 0 <= exit_code <= 255:
        raise ValueError(f"exit_code must be 0..255, got {exit_code}")
    cluster.kubectl(
        "annotate", "pod", pod, "-n", namespace, "--overwrite", f"{EXIT_CODE_ANNOTATION}={exit_code}"
    )
    return wait_for_pod_phase(cluster, namespace, pod, "Succeeded" if exit_code == 0 else "Failed", timeout)


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
        self.health_port = devcluster.free_port()
        self.metrics_port = devcluster.free_port()
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
