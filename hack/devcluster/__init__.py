"""The dev cluster: real Kubernetes control-plane components as plain processes on 127.0.0.1.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake nodes and pod lifecycles), a small
hostPath volume provisioner (hack/local_provisioner.py) and the node agent (hack/nodeagent: the local node,
whose pods run as real processes), each started in its own session, on free ports, logging to a file, and
stopped by the PID recorded when it was started. Certificates, state, logs and the kubeconfig live in
.dev/cluster/ (git-ignored). See docs/dev-cluster.md.

    python -m hack.devcluster up                  start it (idempotent; reuses a running one)
    python -m hack.devcluster down                stop what it started (processes, namespaces, mounts)
    python -m hack.devcluster status              processes, ports, readiness, nodes
    python -m hack.devcluster kubeconfig          print the kubeconfig path
    python -m hack.devcluster services            the loopback address of each Service
    python -m hack.devcluster fake-nodes          print the fake nodes (for another cluster running kwok)
    python -m hack.devcluster kubectl ARGS...     kubectl against the dev cluster (or $KUBECONFIG)
    python -m hack.devcluster exec -- CMD...      run CMD with KUBECONFIG pointing at the cluster

With FTO_USE_EXISTING_CLUSTER=1, `kubeconfig`, `kubectl` and `exec` use $KUBECONFIG instead and `up`/`down`
do nothing. FTO_DEV_GPU_NODES (default 2x8) shapes the fake GPU nodes: COUNTxGPUS.

Modules: layout (files and fixed names), processes (start/stop by record), pki (certificates, kubeconfig),
nodes (the fake nodes), components (binaries and flags), cluster (up/down/sessions), cli.
"""

from __future__ import annotations

import sys

from hack.devcluster.cli import tools_dir
from hack.devcluster.cluster import down, running_state, up
from hack.devcluster.components import find_bin_dir
from hack.devcluster.layout import (
    BUILD_TOOLS,
    GPU_RESOURCE,
    GPU_TAINT,
    REPO_ROOT,
    SERVICE_CIDR,
    Layout,
    use_existing_cluster,
)
from hack.devcluster.nodes import NodeShape, desired_nodes, node_manifest, node_ready
from hack.devcluster.pki import admin_api, issue_certificate, pem
from hack.devcluster.processes import ProcessRecord, State, free_port, loopback_env, process_start_ticks


def command(*args: str) -> list[str]:
    """The command line that runs `python -m hack.devcluster ARGS` (run it with cwd=REPO_ROOT)."""
    return [sys.executable, "-m", "hack.devcluster", *args]


__all__ = [
    "BUILD_TOOLS",
    "GPU_RESOURCE",
    "GPU_TAINT",
    "REPO_ROOT",
    "SERVICE_CIDR",
    "Layout",
    "NodeShape",
    "ProcessRecord",
    "State",
    "admin_api",
    "command",
    "desired_nodes",
    "down",
    "find_bin_dir",
    "free_port",
    "issue_certificate",
    "loopback_env",
    "node_manifest",
    "node_ready",
    "pem",
    "process_start_ticks",
    "running_state",
    "tools_dir",
    "up",
    "use_existing_cluster",
]
