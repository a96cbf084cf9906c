"""The process environment, read in one place: torchrun's variables, the cluster, our own switches.

Torch-free: the launcher reads it before torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Variables that torchrun sets in every worker.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: In-cluster ServiceAccount files (the standard mount).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

#: A kubeconfig for status reporting outside a pod (tests, local runs). In a pod the ServiceAccount is used.
STATUS_KUBECONFIG_ENV = "FTO_STATUS_KUBECONFIG"

#: The DeepSpeed JSON the operator rendered (used when the file exists; computed by the trainer otherwise).
DEEPSPEED_CONFIG_ENV = "FTO_DEEPSPEED_CONFIG"


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


@dataclass(frozen=True)
class TorchrunEnv:
    """Rank wiring as torchrun (or any launcher using the same variables) describes it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    #: Set by torchrun; restarts inside one pod are disabled (--max-restarts=0), so it stays 0.
    restart_count: int = 0
    #: True when a launcher set RANK/WORLD_SIZE (we are a worker, not the pod entrypoint).
    launched: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TorchrunEnv:
        env = os.environ if environ is None else environ
        return cls(
            rank=_int(env, "RANK", 0),
            local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=_int(env, "WORLD_SIZE", 1),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            launched="RANK" in env and "WORLD_SIZE" in env,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Kubernetes pod with a mounted ServiceAccount token."""
    env = os.environ if environ is None else environ
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").is_file()
