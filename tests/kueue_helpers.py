"""Kueue's manager (sigs.k8s.io/kueue, built by `hack/build-tools.sh kueue`) as a process against the test
cluster, the way tests/kube_helpers.py runs our operator. See docs/dev-cluster.md, "Kueue".

The manager runs outside the cluster with the admin kubeconfig (so no ServiceAccount and no RBAC), only the
`batch/job` integration, `manageJobsWithoutQueueName: false` (it touches only Jobs labelled
`kueue.x-k8s.io/queue-name`), leader election off, and every port a free one on 127.0.0.1. Kueue's webhook
configurations are not installed: the API server here cannot reach in-cluster Services, and what Kueue's Job
webhook would ensure (a queued Job is created suspended) our operator already does. Its internal certificate
management (which expects in-cluster Services and a mounted Secret) is off, so it is given self-signed
certificates for its webhook and metrics servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID
from hack import devcluster

from tests.kube_helpers import REPO_ROOT, Cluster, http_ok, terminate, wait_for

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_API = f"{KUEUE_GROUP}/v1beta2"
QUEUE_LABEL = f"{KUEUE_GROUP}/queue-name"
# Kueue v0.17 reads its metrics certificate from this fixed path whenever its internal certificate management
# is off (cmd/kueue/main.go); there is no setting for it.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


def kueue_bin_dir() -> Path:
    """The folder with the `kueue` binary (built on first use: minutes; cached afterwards). Its CRDs are in
    `../crds`. Fails, never skips, when it cannot be built."""
    result = subprocess.run(
        [str(devcluster.BUILD_TOOLS), "kueue"], stdout=subprocess.PIPE, text=True, check=False, cwd=REPO_ROOT
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise AssertionError(f"`hack/build-tools.sh kueue` failed (exit {result.returncode}); see its output")
    return Path(lines[-1])


def _write_self_signed(folder: Path, subject: str) -> None:
    """tls.crt + tls.key for 127.0.0.1/localhost (written atomically, so a reader never sees half)."""
    cert, key = devcluster.issue_certificate(
        subject, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=["127.0.0.1", "localhost"], days=30
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("tls.key", devcluster.pem(key)), ("tls.crt", devcluster.pem(cert))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, folder / name)


def ensure_metrics_certificate() -> None:
    """Put a self-signed certificate where Kueue looks for its metrics certificate, unless one is there."""
    if (METRICS_CERT_DIR / "tls.crt").is_file() and (METRICS_CERT_DIR / "tls.key").is_file():
        return
    try:
        _write_self_signed(METRICS_CERT_DIR, "kueue-metrics")
    except OSError as err:
        raise AssertionError(
            f"Kueue {KUEUE_API} reads its metrics certificate from {METRICS_CERT_DIR}/tls.crt and tls.key "
            f"when its internal certificate management is off, and this user cannot write there ({err}). "
            "Create them once (any self-signed certificate for 127.0.0.1) or run the tests as root."
        ) from err


def kueue_configuration(health_port: int, metrics_port: int, webhook_port: int, cert_dir: Path) -> str:
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "manageJobsWithoutQueueName": False,
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
        # The on-demand visibility API is an aggregated API server (0.0.0.0:8082 by default): not needed.
        "featureGates": {"VisibilityOnDemand": False},
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML


class KueueManager:
    """`kueue --config FILE` as a subprocess; `.start()` waits until /readyz answers, `.stop()` ends it."""

    def __init__(self, binary: Path, kubeconfig: Path, workdir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.log_path = workdir / "kueue.log"
        self.health_port = devcluster.free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _ready(self) -> bool:
        exit_code = self.process.poll() if self.process else None
        if exit_code is not None:
            raise AssertionError(f"Kueue exited ({exit_code}) before it was ready:\n{self.logs()}")
        return http_ok(f"http://127.0.0.1:{self.health_port}/readyz")

    def start(self, timeout: float = 120.0) -> None:
        ensure_metrics_certificate()
        cert_dir = self.workdir / "webhook-certs"
        _write_self_signed(cert_dir, "kueue-webhook")
        config = self.workdir / "kueue-config.yaml"
        ports = devcluster.free_port(), devcluster.free_port()
        config.write_text(kueue_configuration(self.health_port, *ports, cert_dir))
        env = devcluster.loopback_env(strip_proxies=True)
        env["KUBECONFIG"] = str(self.kubeconfig)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), f"--config={config}", "--zap-log-level=2"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        wait_for(self._ready, timeout, f"Kueue's http://127.0.0.1:{self.health_port}/readyz")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only the process this object started."""
        terminate(self.process, timeout)


def apply_kueue_crds(cluster: Cluster, crd_dir: Path) -> list[str]:
    """Apply Kueue's CRDs (copied from the module source by the build) and wait until Established."""
    files = sorted(crd_dir.glob("*.yaml"))
    assert files, f"no Kueue CRDs in {crd_dir} (hack/build-tools.sh kueue copies them there)"
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=fto-tests",
        *(f"-f={p}" for p in files),
    )
    names = [
        doc["metadata"]["name"]
        for path in files
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names


@contextlib.contextmanager
def exclusive(cluster_root: Path) -> Iterator[None]:
    """One Kueue per dev cluster: test sessions sharing the cluster take turns (two managers with leader
    election off would both admit)."""
    cluster_root.mkdir(parents=True, exist_ok=True)
    with (cluster_root / "kueue.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
