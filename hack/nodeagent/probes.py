"""Container probes (httpGet, tcpSocket, exec) and their thresholds, as the kubelet runs them.

httpGet and tcpSocket go to the pod's address from inside the node's network namespace; exec runs the
command inside the container's namespaces (`nsenter` into its PID 1) with the container's environment."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hack.nodeagent.network import NodeSockets


def resolve_port(port: int | str, container: Mapping[str, Any]) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"no container port named {port!r}")


class _NodeHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, timeout: float, sockets: NodeSockets) -> None:
        super().__init__(host, port, timeout=timeout)
        self._sockets = sockets

    def connect(self) -> None:
        self.sock = self._sockets.connect((self.host, self.port), self.timeout or 1.0)


class _NodeHTTPSConnection(_NodeHTTPConnection):
    def connect(self) -> None:
        super().connect()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates either
        self.sock = context.wrap_socket(self.sock, server_hostname=self.host)


def run_probe(
    probe: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    sockets: NodeSockets,
    env: Mapping[str, str],
    init_pid: int | None,
) -> tuple[bool, str]:
    """One probe: (succeeded, what went wrong)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = get.get("host") or pod_ip
            port = resolve_port(get["port"], container)
            cls = _NodeHTTPSConnection if get.get("scheme") == "HTTPS" else _NodeHTTPConnection
            conn = cls(host, port, timeout, sockets)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                headers.setdefault("User-Agent", "kube-probe/1.36")
                conn.request("GET", get.get("path", "/"), headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            if 200 <= status < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {status}"
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            port = resolve_port(tcp["port"], container)
            sockets.connect((tcp.get("host") or pod_ip, port), timeout).close()
            return True, ""
        if "exec" in probe:
            if init_pid is None:
                return False, "the container is not running"
            command = list(probe["exec"].get("command", []))
            result = subprocess.run(
                ["nsenter", "-t", str(init_pid), "-m", "-u", "-p", "-n", "--", *command],
                env=dict(env),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode == 0:
                return True, ""
            return False, f"command {command} exited with {result.returncode}: {result.stdout[-200:]!r}"
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout:g}s"
    except (TimeoutError, OSError, http.client.HTTPException, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return False, f"probe {sorted(probe)} is not supported by the node agent"


@dataclass
class ProbeState:
    """Counting successes and failures against a probe's thresholds."""

    probe: Mapping[str, Any]
    started: float
    result: bool | None = None  # None: not decided yet
    successes: int = 0
    failures: int = 0
    next_at: float = field(default=0.0)
    last_message: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started + float(self.probe.get("initialDelaySeconds", 0))

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> bool | None:
        """Count one result; returns the probe's verdict once a threshold is crossed (else the last one)."""
        self.next_at = now + float(self.probe.get("periodSeconds", 10))
        self.last_message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.result = False
        return self.result


def now() -> float:
    return time.monotonic()
