"""The control-plane components: where their binaries are and how each one is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hack.devcluster.layout import (
    BUILD_TOOLS,
    LOCAL_NODE,
    LOCAL_NODE_GPUS,
    POD_CIDR,
    PROVISIONER,
    PROVISIONER_NAME,
    SA_ISSUER,
    SERVICE_CIDR,
    STAGES_DIR,
    STORAGE_CLASS,
    WAIT_STORAGE_CLASS,
    Layout,
    fail,
)
from hack.devcluster.processes import State


def find_bin_dir() -> Path:
    """The cached binaries (built by hack/build-tools.sh on first use; that takes minutes)."""
    override = os.environ.get("FTO_BIN_DIR")
    if override:
        return Path(override)
    result = subprocess.run([str(BUILD_TOOLS)], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        fail(f"{BUILD_TOOLS} failed (exit {result.returncode})")
    return Path(lines[-1])


def write_kwok_config(layout: Layout) -> None:
    parts = [p.read_text() for p in sorted(STAGES_DIR.glob("*.yaml"))]
    if not parts:
        fail(f"no kwok stages in {STAGES_DIR}")
    layout.kwok_config.write_text("\n---\n".join(parts))


def has_default_route() -> bool:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == "00000000" for line in lines if len(line.split()) > 1)


def component_args(layout: Layout, state: State, etcd_peer_port: int) -> dict[str, list[str]]:
    bin_dir = Path(state.bin_dir)
    pki = layout.pki
    kubeconfig = str(layout.kubeconfig)
    etcd_url = f"http://127.0.0.1:{state.etcd_port}"
    peer_url = f"http://127.0.0.1:{etcd_peer_port}"
    apiserver = [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        f"--secure-port={state.api_port}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--cert-dir={layout.root / 'apiserver'}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",  # on top of the defaults (PodSecurity included)
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        "--event-ttl=1h",
    ]
    if not has_default_route():
        # Without a default route the apiserver cannot pick an advertise address and loopback is refused;
        # any non-loopback address will do when nothing reconciles the `kubernetes` Service endpoints.
        apiserver += ["--advertise-address=192.0.2.1", "--endpoint-reconciler-type=none"]
    return {
        "etcd": [
            str(bin_dir / "etcd"),
            "--name=node0",
            f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=node0={peer_url}",
            "--unsafe-no-fsync=true",
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        "kube-apiserver": apiserver,
        "kube-controller-manager": [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--node-monitor-period=5s",
            "--controllers=*",
        ],
        "kube-scheduler": [
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
        ],
        "kwok": [
            str(bin_dir / "kwok"),
            f"--kubeconfig={kubeconfig}",
            f"--config={layout.kwok_config}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector=type=kwok",
            "--node-lease-duration-seconds=40",
            f"--cidr={POD_CIDR}",
        ],
        "node-agent": [
            sys.executable,
            "-m",
            "hack.nodeagent",
            f"--dev-dir={layout.root}",
            "run",
            f"--node={LOCAL_NODE}",
            f"--gpus={LOCAL_NODE_GPUS}",
        ],
        "local-provisioner": [
            sys.executable,
            str(PROVISIONER),
            f"--kubeconfig={kubeconfig}",
            f"--volumes-dir={layout.volumes}",
            f"--storage-class={STORAGE_CLASS}",
            f"--storage-class={WAIT_STORAGE_CLASS}",
            f"--provisioner-name={PROVISIONER_NAME}",
        ],
    }


def storage_classes() -> list[dict[str, Any]]:
    """The default class binds at once (tests write into a claim before any pod uses it); the second one
    waits for the first pod, like kind's default class and most clouds' (a queued or suspended job's claim
    is then not provisioned until its gang is scheduled)."""
    return [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name, "annotations": annotations},
            "provisioner": PROVISIONER_NAME,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": mode,
        }
        for name, mode, annotations in (
            (STORAGE_CLASS, "Immediate", {"storageclass.kubernetes.io/is-default-class": "true"}),
            (WAIT_STORAGE_CLASS, "WaitForFirstConsumer", {}),
        )
    ]
