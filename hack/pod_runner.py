#!/usr/bin/env python3
"""Run a Pod's container for real on this machine, the way a kubelet would as far as one machine allows.

Pods on the dev cluster's kwok nodes are scheduled and shown Running, but nothing runs. This plays the
kubelet's part for one pod:

1. Reads the Pod (it must be scheduled and Running) and its container's command, args and environment.
   Environment: `value`, `valueFrom.fieldRef` (metadata.name/namespace/uid, labels[...], annotations[...]
   such as `batch.kubernetes.io/job-completion-index`, spec.nodeName, spec.serviceAccountName,
   status.podIP/hostIP), `configMapKeyRef`, `secretKeyRef`, `envFrom`, `$(VAR)` expansion; plus what the
   kubelet adds: HOSTNAME and KUBERNETES_SERVICE_HOST/PORT, which point at the dev API server
   (127.0.0.1:port) instead of the `kubernetes` Service's cluster IP.
2. Materialises the pod's volumes in a temporary folder: configMap and secret (keys or `items`), emptyDir
   (a fresh folder; under /dev/shm for `medium: Memory`), downwardAPI, projected — including the
   ServiceAccount volume that the API server injects: `token` is a real token from the TokenRequest API for
   the pod's serviceAccountName, bound to this pod (`kubectl create token SA --bound-object-kind Pod`), so
   the process has exactly the pod's own permissions; `ca.crt` comes from the kube-root-ca.crt ConfigMap.
   persistentVolumeClaim → the hostPath (or local path) of the PersistentVolume bound to the claim (the dev
   cluster's provisioner makes them under .dev/cluster/volumes); hostPath → itself.
3. Runs the container's command in private mount, UTS and PID namespaces (`unshare --mount --uts --pid`,
   under a minimal init that forwards signals, as `docker run --init` does; when the command ends, every
   process it left behind in the container dies with the namespace), where each
   volume is bind-mounted at its `mountPath` (read-only where the pod says so, `subPath` honoured), the
   hostname is the pod's, /etc/hosts is a kubelet-style hosts file that resolves the pod's own names
   (`<hostname>`, `<hostname>.<subdomain>`, `...<namespace>.svc.cluster.local`) to 127.0.0.1 (there is no
   cluster DNS here), and the container's terminationMessagePath is a real file. So the process sees the
   exact paths and files the pod spec gives it: /etc/finetune/trainer.json from the ConfigMap, /workspace
   on the PV, /var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}. The mounts live and
   die with the namespace; mount points that did not exist are created as empty folders first and removed
   afterwards. This needs root (the dev machine and CI run as root); see docs/demo.md.
4. The image is stood in for by this repository's virtualenv: a command `python`/`python3` becomes
   .venv/bin/python (where the trainer is installed), PATH starts with .venv/bin, and DS_ACCELERATOR=cpu
   because this machine has no GPU (the image would bring CUDA). Nothing else of the host environment leaks
   in (a container does not inherit the node's environment).
5. When the process exits, the pod is ended with the real exit code through the dev cluster's kwok stage
   (annotation `kwok.finetune.dev/exit-code`): 0 → Succeeded, otherwise Failed with that exit code, so the
   Job controller and the operator see the truth. If the pod is deleted while running, the process gets
   SIGTERM and, after terminationGracePeriodSeconds, SIGKILL — as a kubelet would do.

Usage:  pod_runner.py [--kubeconfig PATH] [--namespace NS] [--log FILE] [--no-finish] POD
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
EXIT_CODE_ANNOTATION = "kwok.finetune.dev/exit-code"
"""kwok ends a Running pod that carries this annotation (hack/kwok/pod-exit.yaml)."""
TERMINATION_MESSAGE_ANNOTATION = "kwok.finetune.dev/termination-message"
"""The container's termination message, set together with the exit code, for a kwok stage to copy into
`state.terminated.message` (what a kubelet reports from terminationMessagePath)."""
MESSAGE_MAX_BYTES = 4096
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048
PYTHON_COMMANDS = frozenset(
    {"python", "python3", "/usr/bin/python", "/usr/bin/python3", "/usr/local/bin/python"}
)
#: What the image would provide, stood in for by this machine (see the module docstring, point 4).
IMAGE_ENV = {
    "PATH": f"{VENV_PYTHON.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "DS_ACCELERATOR": "cpu",
}
MOUNT_LOCK = Path(tempfile.gettempdir()) / "fto-pod-runner.lock"
"""Held shared by each run; created mount points are removed only by a run that can take it exclusively."""
POLL_S = 2.0


class PodRunnerError(RuntimeError):
    """The pod cannot be run here (not scheduled, unsupported volume, missing object...)."""


# ------------------------------------------------------------------------------------------------ cluster


@dataclass(frozen=True)
class Kube:
    """kubectl against one cluster."""

    kubectl: Path
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=300, check=False)
        if check and result.returncode != 0:
            raise PodRunnerError(
                f"`kubectl {' '.join(args)}` exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        obj: dict[str, Any] = json.loads(self.run(*args).stdout)
        return obj

    def find(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """Like get, but None when it does not exist."""
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self.run(*args).stdout.strip()
        return json.loads(out) if out else None

    def api_server(self) -> tuple[str, int]:
        """Host and port of the current context's API server."""
        view = json.loads(self.run("config", "view", "--minify", "--raw", "-o", "json").stdout)
        url = urlsplit(view["clusters"][0]["cluster"]["server"])
        if not url.hostname:
            raise PodRunnerError(f"cannot read the API server address from {self.kubeconfig}")
        return url.hostname, url.port or 443


def default_kube(kubeconfig: str | None = None) -> Kube:
    """kubectl and kubeconfig: the arguments, else $KUBECONFIG, else the dev cluster's; kubectl is the dev
    cluster's (or, with FTO_USE_EXISTING_CLUSTER=1, the one on PATH)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from hack import devcluster

    layout = devcluster.Layout.default()
    config = Path(kubeconfig or os.environ.get("KUBECONFIG") or layout.kubeconfig)
    return Kube(kubectl=devcluster.tools_dir(layout) / "kubectl", kubeconfig=config)


# ------------------------------------------------------------------------------------------------ env


_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API `fieldRef.fieldPath` of the pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    keyed = _FIELD_KEY.match(path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    simple: dict[str, Callable[[], Any]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "metadata.labels": lambda: "\n".join(f'{k}="{v}"' for k, v in sorted(meta.get("labels", {}).items())),
        "metadata.annotations": lambda: "\n".join(
            f'{k}="{v}"' for k, v in sorted(meta.get("annotations", {}).items())
        ),
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.hostIP": lambda: status.get("hostIP", ""),
        "status.podIP": lambda: status.get("podIP", ""),
        "status.podIPs": lambda: ",".join(ip["ip"] for ip in status.get("podIPs", [])),
    }
    if path not in simple:
        raise PodRunnerError(f"fieldRef {path!r} is not supported by the pod runner")
    return str(simple[path]())


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is `$`, others stay as they are."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(sub, text)


class ObjectCache:
    """ConfigMaps and Secrets of the pod's namespace, read once each."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self._cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def data(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes]:
        key = (kind, name)
        if key not in self._cache:
            self._cache[key] = self.kube.find(kind, name, self.namespace)
        obj = self._cache[key]
        if obj is None:
            if optional:
                return {}
            raise PodRunnerError(f"{kind} {self.namespace}/{name} does not exist (the pod would not start)")
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def key(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        values = self.data(kind, ref["name"], bool(ref.get("optional")))
        if ref["key"] not in values:
            if ref.get("optional"):
                return None
            raise PodRunnerError(f"{kind} {self.namespace}/{ref['name']} has no key {ref['key']!r}")
        return values[ref["key"]].decode()


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], objects: ObjectCache, api: tuple[str, int]
) -> dict[str, str]:
    """The container's environment: the image's stand-in, the kubelet's own variables, then the pod's."""
    host, port = api
    env = dict(IMAGE_ENV)
    env["HOSTNAME"] = pod["spec"].get("hostname") or pod["metadata"]["name"]
    env.update(
        {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
        }
    )
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, ref_key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if ref_key in source:
                ref = source[ref_key]
                for key, raw in objects.data(kind, ref["name"], bool(ref.get("optional"))).items():
                    env[prefix + key] = raw.decode()
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source:
            value = objects.key("configmap", source["configMapKeyRef"])
        elif "secretKeyRef" in source:
            value = objects.key("secret", source["secretKeyRef"])
        else:
            raise PodRunnerError(f"env {name}: valueFrom {sorted(source)} is not supported by the pod runner")
        if value is not None:
            env[name] = value
    return env


def container_command(container: Mapping[str, Any], env: Mapping[str, str], python: Path) -> list[str]:
    """command + args with `$(VAR)` expanded; the image's python is this repository's virtualenv."""
    command = [expand(part, env) for part in container.get("command", [])]
    args = [expand(part, env) for part in container.get("args", [])]
    if not command:
        raise PodRunnerError("the container has no `command`: the image's entrypoint is unknown here")
    if command[0] in PYTHON_COMMANDS:
        command[0] = str(python)
    return command + args


# ------------------------------------------------------------------------------------------------ volumes


def _write_files(directory: Path, files: Mapping[str, bytes], mode: int) -> None:
    for rel, content in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


def _select(values: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None) -> dict[str, bytes]:
    if not items:
        return dict(values)
    return {item["path"]: values[item["key"]] for item in items if item["key"] in values}


class Volumes:
    """The pod's volumes as folders on this machine."""

    def __init__(self, kube: Kube, pod: Mapping[str, Any], objects: ObjectCache, scratch: Path) -> None:
        self.kube, self.pod, self.objects, self.scratch = kube, pod, objects, scratch
        self.paths: dict[str, Path] = {}
        self.memory_dirs: list[Path] = []

    def materialise(self) -> dict[str, Path]:
        for volume in self.pod["spec"].get("volumes", []):
            self.paths[volume["name"]] = self._one(volume)
        return self.paths

    def _dir(self, name: str) -> Path:
        path = self.scratch / "volumes" / name
        path.mkdir(parents=True)
        return path

    def _one(self, volume: Mapping[str, Any]) -> Path:
        name = volume["name"]
        if "configMap" in volume or "secret" in volume:
            kind, source = (
                ("configmap", volume["configMap"]) if "configMap" in volume else ("secret", volume["secret"])
            )
            ref_name = source.get("name") or source.get("secretName")
            values = self.objects.data(kind, ref_name, bool(source.get("optional")))
            path = self._dir(name)
            _write_files(path, _select(values, source.get("items")), source.get("defaultMode", 0o644))
            return path
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory" and Path("/dev/shm").is_dir():
                path = Path(tempfile.mkdtemp(prefix=f"fto-pod-{name}-", dir="/dev/shm"))
                self.memory_dirs.append(path)
                return path
            return self._dir(name)
        if "persistentVolumeClaim" in volume:
            return self._claim_path(volume["persistentVolumeClaim"]["claimName"])
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                path.mkdir(parents=True, exist_ok=True)
            return path
        if "downwardAPI" in volume:
            path = self._dir(name)
            self._downward(
                path, volume["downwardAPI"].get("items", []), volume["downwardAPI"].get("defaultMode")
            )
            return path
        if "projected" in volume:
            path = self._dir(name)
            self._projected(path, volume["projected"])
            return path
        kinds = sorted(k for k in volume if k != "name")
        raise PodRunnerError(f"volume {name}: type {kinds} is not supported by the pod runner")

    def _claim_path(self, claim: str) -> Path:
        namespace = self.pod["metadata"]["namespace"]
        pvc = self.kube.get("pvc", claim, namespace)
        volume_name = pvc.get("spec", {}).get("volumeName")
        if not volume_name or pvc.get("status", {}).get("phase") != "Bound":
            raise PodRunnerError(f"PersistentVolumeClaim {namespace}/{claim} is not bound")
        pv = self.kube.get("pv", volume_name)
        local = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not local:
            raise PodRunnerError(
                f"PersistentVolume {volume_name} is neither hostPath nor local: its data is not here"
            )
        path = Path(local["path"])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _downward(self, path: Path, items: Sequence[Mapping[str, Any]], mode: int | None) -> None:
        files = {}
        for item in items:
            if "fieldRef" not in item:
                raise PodRunnerError(f"downwardAPI item {item.get('path')}: only fieldRef is supported")
            files[item["path"]] = field_value(self.pod, item["fieldRef"]["fieldPath"]).encode()
        _write_files(path, files, mode or 0o644)

    def _projected(self, path: Path, projected: Mapping[str, Any]) -> None:
        mode = projected.get("defaultMode", 0o644)
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                _write_files(path, {token["path"]: self._token(token).encode()}, 0o600)
            elif "configMap" in source or "secret" in source:
                kind, ref = (
                    ("configmap", source["configMap"])
                    if "configMap" in source
                    else ("secret", source["secret"])
                )
                values = self.objects.data(kind, ref["name"], bool(ref.get("optional")))
                _write_files(path, _select(values, ref.get("items")), mode)
            elif "downwardAPI" in source:
                self._downward(path, source["downwardAPI"].get("items", []), mode)
            else:
                raise PodRunnerError(f"projected source {sorted(source)} is not supported by the pod runner")

    def _token(self, source: Mapping[str, Any]) -> str:
        """A real ServiceAccount token for the pod's ServiceAccount, bound to this pod (TokenRequest API)."""
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        args = [
            "create",
            "token",
            account,
            "-n",
            meta["namespace"],
            "--bound-object-kind=Pod",
            f"--bound-object-name={meta['name']}",
            f"--bound-object-uid={meta['uid']}",
            f"--duration={int(source.get('expirationSeconds', 3607))}s",
        ]
        if source.get("audience"):
            args.append(f"--audience={source['audience']}")
        return self.kube.run(*args).stdout.strip()

    def cleanup(self) -> None:
        for path in self.memory_dirs:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def container_mounts(
    container: Mapping[str, Any], volumes: Mapping[str, Path], env: Mapping[str, str]
) -> list[Mount]:
    mounts = []
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]]
        sub_path = mount.get("subPath") or expand(mount.get("subPathExpr", ""), env)
        if sub_path:
            source = source / sub_path
            if not source.exists():
                source.mkdir(parents=True)  # the kubelet creates a missing subPath as a folder
        mounts.append(Mount(str(source), mount["mountPath"], bool(mount.get("readOnly"))))
    return sorted(mounts, key=lambda m: len(Path(m.target).parts))


def hosts_file(pod: Mapping[str, Any]) -> str:
    """A kubelet-style /etc/hosts; the pod's own names resolve to 127.0.0.1 (its address on this machine)."""
    hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
    names = [hostname]
    subdomain = pod["spec"].get("subdomain")
    if subdomain:
        namespace = pod["metadata"]["namespace"]
        names = [f"{hostname}.{subdomain}.{namespace}.svc.cluster.local", f"{hostname}.{subdomain}", hostname]
    return (
        "# Kubernetes-managed hosts file (hack/pod_runner.py).\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.0.1\t{' '.join(names)}\n"
    )


# ------------------------------------------------------------------------------------------------ running


@dataclass
class PodRun:
    """What happened: the exit code, the log and the termination message the container wrote."""

    namespace: str
    pod: str
    command: list[str]
    env: dict[str, str]
    exit_code: int
    log_path: Path
    termination_message: str = ""
    deleted: bool = False
    mounts: list[Mount] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def mount_points(targets: Sequence[tuple[str, bool]]) -> Iterator[None]:
    """Create missing mount points (folders, or files for file mounts); remove them afterwards when no other
    run is using them. Mounts themselves stay inside the run's private mount namespace."""
    MOUNT_LOCK.touch(exist_ok=True)
    with MOUNT_LOCK.open("r") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        created: list[Path] = []
        for target, is_file in targets:
            path = Path(target)
            missing = [p for p in [path, *path.parents] if not p.exists() and not p.is_symlink()]
            for p in reversed(missing):
                if p == path and is_file:
                    p.touch()
                else:
                    p.mkdir()
                created.append(p)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for p in reversed(created):
                    with contextlib.suppress(OSError):
                        p.unlink() if p.is_file() else p.rmdir()
                fcntl.flock(lock, fcntl.LOCK_UN)


def wait_running(kube: Kube, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """The pod once it is scheduled and Running (kwok marks it so); a kubelet starts containers only then."""
    deadline = time.monotonic() + timeout
    while True:
        pod = kube.find("pod", name, namespace)
        phase = (pod or {}).get("status", {}).get("phase")
        if pod is not None and phase == "Running" and pod["spec"].get("nodeName"):
            return pod
        if phase in ("Succeeded", "Failed"):
            raise PodRunnerError(f"pod {namespace}/{name} has already ended ({phase})")
        if time.monotonic() > deadline:
            raise PodRunnerError(
                f"pod {namespace}/{name} is not Running after {timeout:.0f}s (phase {phase})"
            )
        time.sleep(0.5)


def _pick_container(pod: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    if pod["spec"].get("initContainers"):
        raise PodRunnerError("pods with initContainers are not supported by the pod runner")
    containers: list[dict[str, Any]] = pod["spec"]["containers"]
    if name is None:
        if len(containers) != 1:
            raise PodRunnerError(f"the pod has {len(containers)} containers; name one with --container")
        return containers[0]
    for container in containers:
        if container["name"] == name:
            return container
    raise PodRunnerError(f"the pod has no container {name!r}")


@functools.cache
def cannot_run_pods() -> str | None:
    """Why pods can't be run on this machine (None: they can). Root alone is not enough in some
    containers, so the namespaces are tried once."""
    if os.geteuid() != 0:
        return (
            "the pod runner needs root to give the process the pod's mounts in a private mount namespace "
            "(run as root, e.g. in the dev container or CI)"
        )
    if not shutil.which("unshare"):
        return "`unshare` (util-linux) is needed to run a pod"
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--pid", "--fork", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"this machine refuses private mount/PID namespaces: {probe.stderr.strip()}"
    return None


def run_pod(
    kube: Kube,
    namespace: str,
    name: str,
    *,
    container: str | None = None,
    log_path: Path | None = None,
    echo: Callable[[str], None] | None = None,
    on_start: Callable[[Container], None] | None = None,
    finish: bool = True,
    python: Path = VENV_PYTHON,
    running_timeout: float = 120.0,
) -> PodRun:
    """Run the pod's container to completion here and (with `finish`) end the pod with its exit code.

    Output goes to `log_path` (default: a temporary file) and, line by line, to `echo` when given.
    `on_start` gets the running `Container` (e.g. to kill it as an out-of-memory kill would)."""
    reason = cannot_run_pods()
    if reason is not None:
        raise PodRunnerError(reason)
    pod = wait_running(kube, namespace, name, running_timeout)
    spec = _pick_container(pod, container)
    objects = ObjectCache(kube, namespace)
    env = container_env(pod, spec, objects, kube.api_server())
    command = container_command(spec, env, python if python.exists() else Path(sys.executable))

    scratch = Path(tempfile.mkdtemp(prefix=f"fto-pod-{name}-"))
    volumes = Volumes(kube, pod, objects, scratch)
    try:
        mounts = container_mounts(spec, volumes.materialise(), env)
        (scratch / "hosts").write_text(hosts_file(pod))
        termination_log = scratch / "termination-log"
        termination_log.touch()
        termination_path = spec.get("terminationMessagePath", "/dev/termination-log")
        mounts.append(Mount(str(scratch / "hosts"), "/etc/hosts", True))
        mounts.append(Mount(str(termination_log), termination_path, False))
        plan = {
            "mounts": [m.__dict__ for m in mounts],
            "hostname": env["HOSTNAME"],
            "workingDir": spec.get("workingDir", "/"),
            "command": command,
            "env": env,
        }
        plan_path = scratch / "plan.json"
        plan_path.write_text(json.dumps(plan, indent=1))
        log_path = log_path or scratch.parent / f"{scratch.name}.log"
        targets = [(m.target, Path(m.source).is_file()) for m in mounts]
        with mount_points(targets):
            exit_code, deleted = _supervise(
                kube,
                pod,
                [
                    "unshare",
                    "--mount",
                    "--uts",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    __file__,
                    "--inner",
                    str(plan_path),
                ],
                log_path,
                echo,
                on_start,
            )
        run = PodRun(
            namespace=namespace,
            pod=name,
            command=command,
            env=env,
            exit_code=exit_code,
            log_path=log_path,
            termination_message=termination_message(
                termination_log, log_path, spec.get("terminationMessagePolicy"), exit_code
            ),
            deleted=deleted,
            mounts=mounts,
        )
    finally:
        volumes.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
    if finish and not run.deleted:
        finish_pod(kube, namespace, name, run.exit_code, run.termination_message)
    return run


def termination_message(message_file: Path, log_path: Path, policy: str | None, exit_code: int) -> str:
    """The kubelet's rule: the terminationMessagePath file (at most 4 KiB); when it is empty, the policy is
    FallbackToLogsOnError and the container failed, the end of its log (80 lines, 2 KiB)."""
    message = message_file.read_bytes()[:MESSAGE_MAX_BYTES].decode(errors="replace").strip()
    if message or policy != "FallbackToLogsOnError" or exit_code == 0 or not log_path.exists():
        return message
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_FALLBACK_LINES:])
    return tail.encode()[-LOG_FALLBACK_BYTES:].decode(errors="replace").strip()


class Container:
    """The running container. `unshare` (our child) forks its PID 1, `inner` (a minimal init), which runs the
    command as its child. Signals go to the command, as a runtime's init forwards them; once it has ended,
    init exits with its code and the kernel kills whatever else ran in the container (torchrun's workers
    have sessions of their own, so signalling a process group would miss them)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    @staticmethod
    def _child(pid: int) -> int | None:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def main_pid(self) -> int | None:
        """The command's process as seen from here (None before it started or after it ended)."""
        init = self._child(self.proc.pid)
        return self._child(init) if init is not None else None

    def signal(self, signum: int) -> None:
        pid = self.main_pid()
        with contextlib.suppress(ProcessLookupError):
            if pid is not None:
                os.kill(pid, signum)
            elif self.proc.poll() is None:
                self.proc.send_signal(signum)

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after the grace period (the kubelet's order)."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:  # stuck before the command ran: end the namespace itself
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)


def _supervise(
    kube: Kube,
    pod: Mapping[str, Any],
    cmd: list[str],
    log_path: Path,
    echo: Callable[[str], None] | None,
    on_start: Callable[[Container], None] | None = None,
) -> tuple[int, bool]:
    """Run `cmd`, copy its output to the log (and `echo`), stop it when the pod is deleted.

    Returns (exit code, whether the pod was deleted while it ran). Exit codes follow the container runtime's
    convention: 128 + N for death by signal N (`inner`, the container's init, reports it so)."""
    meta = pod["metadata"]
    grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        container = Container(proc)
        if on_start is not None:
            on_start(container)
        deleted = threading.Event()

        def watch() -> None:
            while proc.poll() is None:
                current = kube.find("pod", meta["name"], meta["namespace"])
                if (
                    current is None
                    or current["metadata"].get("uid") != meta["uid"]
                    or (current["metadata"].get("deletionTimestamp"))
                ):
                    deleted.set()
                    container.stop(grace)
                    return
                time.sleep(POLL_S)

        def forward(signum: int, frame: object) -> None:
            container.stop(grace)

        watcher = threading.Thread(target=watch, name="pod-watch", daemon=True)
        watcher.start()
        # Our own SIGTERM/Ctrl-C stops the container as a pod deletion would (only the main thread may
        # install handlers; a caller running us in a thread keeps its own).
        in_main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
        previous = {s: signal.signal(s, forward) for s in signals}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo is not None:
                    echo(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # we are leaving on an exception: never leave the container behind
                container.stop(0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return (128 - code if code < 0 else code), deleted.is_set()


def finish_pod(
    kube: Kube, namespace: str, name: str, exit_code: int, message: str = "", timeout: float = 60.0
) -> None:
    """End the pod through kwok with the process's exit code (and termination message, in the same update)
    and wait until the API shows it."""
    annotations = [f"{EXIT_CODE_ANNOTATION}={exit_code}"]
    if message:
        annotations.insert(0, f"{TERMINATION_MESSAGE_ANNOTATION}={message}")
    kube.run("annotate", "pod", name, "-n", namespace, "--overwrite", *annotations)
    want = "Succeeded" if exit_code == 0 else "Failed"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = kube.find("pod", name, namespace)
        if pod is None or pod.get("status", {}).get("phase") == want:
            return
        time.sleep(0.5)
    raise PodRunnerError(f"pod {namespace}/{name} did not become {want} after its exit code was recorded")


# ------------------------------------------------------------------------------------------------ inside


FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def inner(plan_path: Path) -> int:
    """PID 1 of the container's namespaces: bind the volumes, set the hostname, start the command, forward
    signals to it, reap orphans, and exit with its exit code (128 + N when signal N ended it), like
    `docker run --init`. When this returns, the kernel ends whatever else still runs in the namespace."""
    plan = json.loads(plan_path.read_text())
    for mount in plan["mounts"]:
        target = Path(mount["target"])
        if not target.exists():  # a mount point inside a volume mounted before it (as runc makes them)
            if Path(mount["source"]).is_dir():
                target.mkdir(parents=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
        subprocess.run(["mount", "--bind", mount["source"], mount["target"]], check=True)
        if mount["read_only"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", mount["target"]], check=True)
    socket.sethostname(plan["hostname"])
    os.chdir(plan["workingDir"])
    command: list[str] = plan["command"]
    main_pid = os.fork()
    if main_pid == 0:
        try:
            os.execvpe(command[0], command, plan["env"])
        except OSError as exc:
            print(f"pod runner: cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda sig, frame: os.kill(main_pid, sig))
    while True:
        pid, status = os.wait()
        if pid == main_pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pod", nargs="?", help="the pod's name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the dev cluster's")
    parser.add_argument("-c", "--container", help="container name (when the pod has several)")
    parser.add_argument("--log", type=Path, help="write the container's output here too")
    parser.add_argument(
        "--no-finish", action="store_true", help="leave the pod Running when the process ends"
    )
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args.inner)
    if not args.pod:
        parser.error("name a pod")
    try:
        run = run_pod(
            default_kube(args.kubeconfig),
            args.namespace,
            args.pod,
            container=args.container,
            log_path=args.log,
            echo=lambda line: print(line, end="", flush=True),
            finish=not args.no_finish,
        )
    except PodRunnerError as exc:
        print(f"pod runner: {exc}", file=sys.stderr)
        return 1
    ended = "deleted while running" if run.deleted else f"exit code {run.exit_code}"
    print(f"pod runner: {args.namespace}/{args.pod} ended: {ended}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
