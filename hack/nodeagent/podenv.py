"""What a container sees of its pod: its environment (`value`, `valueFrom` fieldRef/configMapKeyRef/
secretKeyRef, `envFrom`, `$(VAR)` expansion, the kubelet's own variables), its command line (the image is
stood in for by this repository's virtualenv) and its /etc/hosts."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hack.kube import Api

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON_COMMANDS = frozenset(
    {"python", "python3", "/usr/bin/python", "/usr/bin/python3", "/usr/local/bin/python"}
)
#: What the image would provide, stood in for by this machine: the virtualenv's tools first on PATH, and
#: DS_ACCELERATOR=cpu because this machine has no GPU (the image would bring CUDA). Nothing else of the host
#: environment leaks in (a container does not inherit the node's environment).
IMAGE_ENV = {
    "PATH": f"{VENV_PYTHON.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "DS_ACCELERATOR": "cpu",
}


class PodError(RuntimeError):
    """The pod cannot be run here as written (unsupported field, missing object...): reported on the
    container's status, as a kubelet reports CreateContainerConfigError."""


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
        raise PodError(f"fieldRef {path!r} is not supported by the node agent")
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

    def __init__(self, api: Api, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self._cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def data(self, kind: str, name: str, optional: bool = False) -> dict[str, bytes]:
        key = (kind, name)
        if key not in self._cache:
            plural = "secrets" if kind == "secret" else "configmaps"
            self._cache[key] = self.api.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        obj = self._cache[key]
        if obj is None:
            if optional:
                return {}
            raise PodError(f"{kind} {self.namespace}/{name} does not exist (the pod would not start)")
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
            raise PodError(f"{kind} {self.namespace}/{ref['name']} has no key {ref['key']!r}")
        return values[ref["key"]].decode()


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], objects: ObjectCache, api: tuple[str, int]
) -> dict[str, str]:
    """The container's environment: the image's stand-in, the kubelet's own variables (the API server is the
    `kubernetes` Service's cluster IP, which the agent forwards to it), then the pod's."""
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
            raise PodError(f"env {name}: valueFrom {sorted(source)} is not supported by the node agent")
        if value is not None:
            env[name] = value
    return env


def container_command(container: Mapping[str, Any], env: Mapping[str, str], python: Path) -> list[str]:
    """command + args with `$(VAR)` expanded; the image's python is this repository's virtualenv."""
    command = [expand(part, env) for part in container.get("command", [])]
    args = [expand(part, env) for part in container.get("args", [])]
    if not command:
        raise PodError("the container has no `command`: the image's entrypoint is unknown here")
    if command[0] in PYTHON_COMMANDS:
        command[0] = str(python)
    return command + args


def hosts_file(pod: Mapping[str, Any], pod_ip: str) -> str:
    """A kubelet-style /etc/hosts: the pod's own names resolve to its IP (there is no cluster DNS here)."""
    hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
    names = [hostname]
    subdomain = pod["spec"].get("subdomain")
    if subdomain:
        namespace = pod["metadata"]["namespace"]
        names = [f"{hostname}.{subdomain}.{namespace}.svc.cluster.local", f"{hostname}.{subdomain}", hostname]
    return (
        "# Kubernetes-managed hosts file (hack/nodeagent).\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"{pod_ip}\t{' '.join(names)}\n"
    )
