#!/usr/bin/env python3
"""The dev cluster: real Kubernetes control-plane components as plain processes on 127.0.0.1.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (fake nodes and pod lifecycles) and a
small hostPath volume provisioner (hack/local_provisioner.py), each started in its own session, on free
ports, logging to a file, and stopped by the PID recorded when it was started. Certificates, state, logs and
the kubeconfig live in .dev/cluster/ (git-ignored). See docs/dev-cluster.md.

    devcluster.py up                  start it (idempotent; reuses a running one)
    devcluster.py down                stop the processes it started (reverse order, SIGTERM then SIGKILL)
    devcluster.py status              processes, ports, readiness, nodes
    devcluster.py kubeconfig          print the kubeconfig path
    devcluster.py fake-nodes          print the fake nodes (for another cluster running kwok, e.g. kind)
    devcluster.py kubectl ARGS...     kubectl against the dev cluster (or $KUBECONFIG, see below)
    devcluster.py exec -- CMD...      run CMD with KUBECONFIG pointing at the cluster

With FTO_USE_EXISTING_CLUSTER=1, `kubeconfig`, `kubectl` and `exec` use $KUBECONFIG instead and `up`/`down`
do nothing. FTO_DEV_GPU_NODES (default 2x8) shapes the fake GPU nodes: COUNTxGPUS.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_TOOLS = REPO_ROOT / "hack" / "build-tools.sh"
STAGES_DIR = REPO_ROOT / "hack" / "kwok"
PROVISIONER = REPO_ROOT / "hack" / "local_provisioner.py"

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
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


# --------------------------------------------------------------------------------------------- processes


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


def spawn(layout: Layout, state: State, name: str, args: list[str]) -> ProcessRecord:
    log_path = layout.logs / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=loopback_env(strip_proxies=True),
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


# --------------------------------------------------------------------------------------------- PKI


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def issue_certificate(
    subject: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
    organization: str | None = None,
    sans: Sequence[str] = (),
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 certificate: a CA when `usage` is None, else a leaf signed by `issuer` (self-signed
    without one). `sans` are DNS names or IP addresses. Also used by tests for webhook servers."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attributes)
    signer_cert, signer_key = issuer if issuer else (None, key)
    is_ca = usage is None
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    return builder.sign(signer_key, hashes.SHA256()), key


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_pki(pki: Path) -> None:
    """One CA; a serving certificate for the apiserver; an admin client certificate (system:masters);
    an RSA key that signs service-account tokens. Made once and kept across restarts."""
    if (pki / "sa.key").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    ca = issue_certificate("finetune-operator-dev-ca", days=3650)
    sans = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "127.0.0.1",
        str(ipaddress.ip_network(SERVICE_CIDR)[1]),  # the `kubernetes` Service's ClusterIP
    ]
    files = {
        "ca": ca,
        "apiserver": issue_certificate(
            "kube-apiserver", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
        ),
        "admin": issue_certificate(
            "kubernetes-admin",
            issuer=ca,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            organization="system:masters",
        ),
    }
    for name, (cert, key) in files.items():
        (pki / f"{name}.crt").write_bytes(pem(cert))
        (pki / f"{name}.key").write_bytes(pem(key))
        (pki / f"{name}.key").chmod(0o600)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (pki / "sa.key").write_bytes(pem(sa_key))  # written last: its presence means the PKI is complete
    (pki / "sa.key").chmod(0o600)


def write_kubeconfig(layout: Layout, api_url: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((layout.pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fto-dev",
                "cluster": {"server": api_url, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "fto-dev-admin",
                "user": {
                    "client-certificate-data": b64("admin.crt"),
                    "client-key-data": b64("admin.key"),
                },
            }
        ],
        "contexts": [{"name": "fto-dev", "context": {"cluster": "fto-dev", "user": "fto-dev-admin"}}],
        "current-context": "fto-dev",
    }
    tmp = layout.kubeconfig.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    tmp.chmod(0o600)
    tmp.replace(layout.kubeconfig)


# --------------------------------------------------------------------------------------------- API


class Api:
    """A minimal client for bootstrapping (stdlib only, so `up` starts fast)."""

    def __init__(self, base_url: str, pki: Path) -> None:
        self.base_url = base_url
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.context)
        )

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        content_type: str = "application/json",
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, path: str, timeout: float = 3.0) -> bool:
        try:
            status, _ = self.request("GET", path, timeout=timeout)
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    def create_or_update(self, collection: str, obj: dict[str, Any]) -> None:
        """POST; on conflict, merge-patch the object (and its status, where given)."""
        status, body = self.request("POST", collection, obj)
        if status == 409:
            name = obj["metadata"]["name"]
            patch = {k: v for k, v in obj.items() if k not in ("status", "apiVersion", "kind")}
            status, body = self.request(
                "PATCH", f"{collection}/{name}", patch, "application/merge-patch+json"
            )
            if status == 200 and "status" in obj:
                status, body = self.request(
                    "PATCH",
                    f"{collection}/{name}/status",
                    {"status": obj["status"]},
                    "application/merge-patch+json",
                )
        if status not in (200, 201):
            fail(f"{collection}: HTTP {status}: {body}")


# --------------------------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeShape:
    count: int
    gpus: int

    @classmethod
    def parse(cls, text: str) -> NodeShape:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not match:
            fail(f"FTO_DEV_GPU_NODES={text!r}: expected COUNTxGPUS, e.g. 2x8")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def from_env(cls) -> NodeShape:
        return cls.parse(os.environ.get("FTO_DEV_GPU_NODES", DEFAULT_GPU_NODES))

    def __str__(self) -> str:
        return f"{self.count}x{self.gpus}"


def node_manifest(
    name: str, cpu: str, memory: str, gpus: int, labels: dict[str, str], taints: list[dict[str, str]]
) -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **labels},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def desired_nodes(shape: NodeShape) -> list[dict[str, Any]]:
    gpu_labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": GPU_PRODUCT}
    nodes = [
        node_manifest(f"gpu-node-{i}", "64", "512Gi", shape.gpus, gpu_labels, [dict(GPU_TAINT)])
        for i in range(shape.count)
    ]
    nodes.append(node_manifest("cpu-node-0", "16", "64Gi", 0, {}, []))
    return nodes


def ensure_nodes(api: Api, shape: NodeShape) -> list[str]:
    """Create (or reshape) the fake nodes; remove GPU nodes beyond the wanted count."""
    wanted = desired_nodes(shape)
    for node in wanted:
        api.create_or_update("/api/v1/nodes", node)
    names = [n["metadata"]["name"] for n in wanted]
    status, existing = api.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    if status == 200:
        for item in existing["items"]:
            name = item["metadata"]["name"]
            if name.startswith("gpu-node-") and name not in names:
                api.request("DELETE", f"/api/v1/nodes/{name}")
    return names


def node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    taints = node.get("spec", {}).get("taints", [])
    return ready and not any(t["key"] == NOT_READY_TAINT for t in taints)


# --------------------------------------------------------------------------------------------- start/stop


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


def wait_until(what: str, check: Callable[[], bool], state: State, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for record in state.processes:
            if not record.alive():
                fail(f"{record.name} exited while waiting for {what}; last log lines:\n{log_tail(record)}")
        if time.monotonic() > deadline:
            logs = Path(state.processes[0].log).parent
            fail(f"timed out after {timeout:.0f}s waiting for {what} (logs in {logs})")
        time.sleep(0.25)


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


def cluster_ready(api: Api, node_names: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        if not api.ok("/api/v1/namespaces/default/serviceaccounts/default"):
            return False
        status, nodes = api.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
        if status != 200:
            return False
        ready = {n["metadata"]["name"] for n in nodes["items"] if node_ready(n)}
        return set(node_names) <= ready

    return check


def running_state(layout: Layout, patience_s: float = 30.0) -> State | None:
    """The recorded cluster, if every process of it is alive and the apiserver answers /readyz.

    A busy machine can make /readyz slow or briefly unready; since the alternative is to restart a cluster
    that others may be using, a live one gets `patience_s` to answer."""
    state = State.load(layout)
    if state is None or not state.processes or not all(p.alive() for p in state.processes):
        return None
    api = Api(state.api_url, layout.pki)
    deadline = time.monotonic() + patience_s
    while not api.ok("/readyz", timeout=10.0):
        if time.monotonic() > deadline or not all(p.alive() for p in state.processes):
            return None
        time.sleep(1.0)
    return state


def up(layout: Layout, started_by: str) -> tuple[State, bool]:
    """Start the cluster unless it runs already. Returns (state, started_now)."""
    began = time.monotonic()
    shape = NodeShape.from_env()
    state = running_state(layout)
    if state is not None:
        api = Api(state.api_url, layout.pki)
        if state.gpu_nodes != str(shape):
            log(f"reshaping GPU nodes {state.gpu_nodes} -> {shape}")
            names = ensure_nodes(api, shape)
            wait_until("nodes Ready", cluster_ready(api, names), state)
            state.gpu_nodes = str(shape)
        if started_by == "cli" and state.started_by != "cli":
            state.started_by = "cli"  # asked for by a person now: no test session may stop it
        state.save(layout)
        log(f"dev cluster already running at {state.api_url} (kubeconfig: {layout.kubeconfig})")
        return state, False

    previous = State.load(layout)
    if previous is not None:
        stopped = stop_processes(previous.processes)
        if stopped:
            log(f"stopped {stopped} leftover process(es) of an unhealthy dev cluster")
        layout.state_file.unlink(missing_ok=True)

    bin_dir = find_bin_dir()
    for d in (layout.etcd_data, layout.volumes, layout.logs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700 if d == layout.etcd_data else 0o777)  # etcd wants its folder private
    ensure_pki(layout.pki)
    state = State(
        version=STATE_VERSION,
        api_port=free_port(),
        etcd_port=free_port(),
        bin_dir=str(bin_dir),
        gpu_nodes=str(shape),
        started_by=started_by,
        started_at=time.time(),
    )
    write_kubeconfig(layout, state.api_url)
    write_kwok_config(layout)
    args = component_args(layout, state, etcd_peer_port=free_port())
    api = Api(state.api_url, layout.pki)

    log(f"starting etcd on 127.0.0.1:{state.etcd_port}")
    spawn(layout, state, "etcd", args["etcd"])
    wait_until("etcd", lambda: _http_ok(f"http://127.0.0.1:{state.etcd_port}/health"), state)
    log(f"starting kube-apiserver on 127.0.0.1:{state.api_port}")
    spawn(layout, state, "kube-apiserver", args["kube-apiserver"])
    wait_until("kube-apiserver /readyz", lambda: api.ok("/readyz"), state)
    log(f"kube-apiserver ready ({time.monotonic() - began:.1f}s)")
    for name in ("kube-controller-manager", "kube-scheduler", "kwok", "local-provisioner"):
        spawn(layout, state, name, args[name])
    log("started kube-controller-manager, kube-scheduler, kwok, local-provisioner")
    for storage_class in storage_classes():
        api.create_or_update("/apis/storage.k8s.io/v1/storageclasses", storage_class)
    names = ensure_nodes(api, shape)
    log(f"created nodes {', '.join(names)}; waiting for them to be Ready and for default/default")
    wait_until("Ready nodes and the default ServiceAccount", cluster_ready(api, names), state)
    log(f"dev cluster ready in {time.monotonic() - began:.1f}s; kubeconfig: {layout.kubeconfig}")
    return state, True


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2.0) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def down(layout: Layout) -> int:
    state = State.load(layout)
    if state is None:
        log("no dev cluster recorded; nothing to stop")
        return 0
    stopped = stop_processes(state.processes)
    layout.state_file.unlink(missing_ok=True)
    shutil.rmtree(layout.sessions, ignore_errors=True)
    log(f"stopped {stopped} process(es)")
    return stopped


# --------------------------------------------------------------------------------------------- sessions


def _live_sessions(layout: Layout) -> list[int]:
    pids = []
    for entry in layout.sessions.glob("*") if layout.sessions.is_dir() else []:
        try:
            pid, ticks = int(entry.name), int(entry.read_text())
        except ValueError:
            continue
        if process_start_ticks(pid) == ticks:
            pids.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return pids


def session_up(layout: Layout, pid: int) -> None:
    """`up` for a test session: start or reuse the cluster and register the session as a user of it."""
    with locked(layout):
        _, started_now = up(layout, started_by="session")
        ticks = process_start_ticks(pid)
        if ticks is None:
            fail(f"session pid {pid} is not running")
        layout.sessions.mkdir(exist_ok=True)
        (layout.sessions / str(pid)).write_text(str(ticks))
        if started_now:
            log("started for this test session; stopped when the last session using it ends")


def session_release(layout: Layout, pid: int) -> None:
    """The session is done: if a test session started the cluster and no other session uses it, stop it."""
    with locked(layout):
        (layout.sessions / str(pid)).unlink(missing_ok=True)
        state = State.load(layout)
        if state is None or state.started_by != "session" or os.environ.get("FTO_KEEP_CLUSTER") == "1":
            return
        others = _live_sessions(layout)
        if others:
            log(f"dev cluster still used by test session(s) {others}; leaving it running")
            return
        down(layout)


# --------------------------------------------------------------------------------------------- CLI


def target_kubeconfig(layout: Layout) -> Path:
    if use_existing_cluster():
        path = os.environ.get("KUBECONFIG", "")
        if not path:
            fail("FTO_USE_EXISTING_CLUSTER=1 needs KUBECONFIG set")
        return Path(path)
    if running_state(layout) is None:
        fail("the dev cluster is not running: start it with `make cluster-up`")
    return layout.kubeconfig


def cmd_status(layout: Layout) -> int:
    state = State.load(layout)
    if state is None:
        print("dev cluster: not running")
        return 1
    api = Api(state.api_url, layout.pki)
    ready = api.ok("/readyz")
    print(f"dev cluster: {'ready' if ready else 'NOT ready'} at {state.api_url}")
    print(f"kubeconfig:  {layout.kubeconfig}")
    print(f"binaries:    {state.bin_dir}")
    print(f"GPU nodes:   {state.gpu_nodes} (started by {state.started_by})")
    for record in state.processes:
        print(
            f"  {record.name:<24} pid {record.pid:<8} {'running' if record.alive() else 'DEAD'}  {record.log}"
        )
    if ready:
        _, nodes = api.request("GET", "/api/v1/nodes")
        for node in nodes["items"]:
            gpus = node["status"].get("allocatable", {}).get(GPU_RESOURCE, "0")
            readiness = "Ready" if node_ready(node) else "NotReady"
            print(f"  node {node['metadata']['name']:<18} {readiness:<9} gpus={gpus}")
    return 0 if ready and all(p.alive() for p in state.processes) else 1


def tools_dir(layout: Layout) -> Path:
    """The binaries of the running dev cluster; with an existing cluster, kubectl on PATH wins."""
    if use_existing_cluster():
        on_path = shutil.which("kubectl")
        return Path(on_path).parent if on_path else find_bin_dir()
    state = State.load(layout)
    return Path(state.bin_dir) if state else find_bin_dir()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devcluster.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the dev cluster (idempotent)")
    p_up.add_argument("--session", type=int, help=argparse.SUPPRESS)
    p_down = sub.add_parser("down", help="stop the processes the dev cluster started")
    p_down.add_argument("--force", action="store_true", help="stop it even while test sessions use it")
    p_release = sub.add_parser("release", help="a test session is done with the cluster (tests/conftest.py)")
    p_release.add_argument("--session", type=int, required=True)
    sub.add_parser("status", help="processes, readiness and nodes")
    sub.add_parser(
        "fake-nodes", help="print the fake nodes as a List, for `kubectl apply -f -` (e.g. on kind)"
    )
    sub.add_parser("kubeconfig", help="print the kubeconfig path")
    sub.add_parser("kubectl", help="kubectl against the cluster", add_help=False)
    sub.add_parser("exec", help="run a command with KUBECONFIG set", add_help=False)
    args_list = list(sys.argv[1:] if argv is None else argv)
    # kubectl/exec pass everything after them through untouched.
    if args_list and args_list[0] in ("kubectl", "exec"):
        command, rest = args_list[0], args_list[1:]
    else:
        command, rest = "", []
        parsed = parser.parse_args(args_list)
        command = parsed.command

    layout = Layout.default()
    if command == "up":
        if use_existing_cluster():
            log("FTO_USE_EXISTING_CLUSTER=1: using $KUBECONFIG; not starting a dev cluster")
            return 0
        if parsed.session is not None:
            session_up(layout, parsed.session)
        else:
            with locked(layout):
                up(layout, started_by="cli")
        return 0
    if command == "down":
        if use_existing_cluster():
            log("FTO_USE_EXISTING_CLUSTER=1: not stopping anything")
            return 0
        with locked(layout):
            users = _live_sessions(layout)
            if users and not parsed.force:
                fail(
                    f"test session(s) {users} are using the dev cluster; wait for them or use `down --force`"
                )
            down(layout)
        return 0
    if command == "release":
        session_release(layout, parsed.session)
        return 0
    if command == "status":
        return cmd_status(layout)
    if command == "fake-nodes":
        print(
            json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": desired_nodes(NodeShape.from_env())}, indent=2
            )
        )
        return 0
    if command == "kubeconfig":
        print(os.environ.get("KUBECONFIG", "") if use_existing_cluster() else layout.kubeconfig)
        return 0
    return run_against_cluster(layout, command, rest)


def run_against_cluster(layout: Layout, command: str, rest: list[str]) -> NoReturn:
    """`kubectl ARGS...` or `exec -- CMD...` with KUBECONFIG (and the tools on PATH) set.

    Replaces this process."""
    env = loopback_env(strip_proxies=False)
    env["KUBECONFIG"] = str(target_kubeconfig(layout))
    bin_dir = tools_dir(layout)
    if command == "kubectl":
        kubectl = str(bin_dir / "kubectl")
        os.execve(kubectl, [kubectl, *rest], env)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        fail("usage: devcluster.py exec -- COMMAND [ARGS...]")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # kubectl, helm
    os.execvpe(rest[0], rest, env)


if __name__ == "__main__":
    sys.exit(main())
