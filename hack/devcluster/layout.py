"""Where the dev cluster keeps its files, its fixed names, and how its commands report."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = REPO_ROOT / "hack" / "build-tools.sh"
STAGES_DIR = REPO_ROOT / "hack" / "kwok"
PROVISIONER = REPO_ROOT / "hack" / "local_provisioner.py"

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
LOCAL_NODE = "local-0"
"""The node agent's node (hack/nodeagent): its pods run on this machine."""
LOCAL_NODE_GPUS = int(os.environ.get("FTO_DEV_LOCAL_GPUS", "2"))
"""Fake `nvidia.com/gpu` capacity of the local node (the trainer runs on the CPU)."""
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
STORAGE_CLASS = "standard"
WAIT_STORAGE_CLASS = "standard-wffc"
PROVISIONER_NAME = "finetune.dev/local-hostpath"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_GPU_NODES = "2x8"
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0
STATE_VERSION = 1


def log(message: str) -> None:
    print(f"[devcluster {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message: str) -> NoReturn:
    print(f"devcluster: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def use_existing_cluster() -> bool:
    return os.environ.get("FTO_USE_EXISTING_CLUSTER", "") == "1"


# --------------------------------------------------------------------------------------------- layout


class Layout:
    """Where the dev cluster keeps its files (one folder, git-ignored; FTO_DEV_DIR moves it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.etcd_data = root / "etcd"
        self.volumes = root / "volumes"
        self.sessions = root / "sessions"  # test sessions using the cluster (tests/conftest.py)
        self.kubeconfig = root / "kubeconfig"
        self.kwok_config = root / "kwok.yaml"
        self.state_file = root / "state.json"
        self.lock_file = root / "lock"
        self.service_forwarders_file = root / "node" / "services.json"  # written by the node agent

    def service_forwarders(self) -> dict[str, str]:
        """`namespace/service:port` -> `http://127.0.0.1:PORT`: the local node's loopback forwarder of each
        Service port (what `python -m hack.devcluster services` prints); empty without a local node."""
        try:
            forwarders = json.loads(self.service_forwarders_file.read_text())
        except (OSError, ValueError):
            return {}
        return {key: f"http://{host}:{port}" for key, (host, port) in forwarders.items()}

    @classmethod
    def default(cls) -> Layout:
        return cls(Path(os.environ.get("FTO_DEV_DIR", str(REPO_ROOT / ".dev" / "cluster"))).resolve())


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Serialise up/down/release between concurrent callers (several test sessions share one cluster)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
