"""The pod's volumes as folders on this machine, and the container's bind mounts.

configMap and secret (keys or `items`), emptyDir (one folder per pod, shared by its containers; under
/dev/shm for `medium: Memory`), downwardAPI, projected (including the ServiceAccount volume: a real bound
token from the TokenRequest API and `ca.crt` from kube-root-ca.crt), persistentVolumeClaim (the hostPath or
local path of the bound PersistentVolume) and hostPath. Mounts honour `subPath`/`subPathExpr`, `readOnly`."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hack.kube import Api, ApiError
from hack.nodeagent.podenv import ObjectCache, PodError, expand, field_value


def _write_files(
    directory: Path, files: Mapping[str, bytes], mode: int, items: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Write `files` with the volume's mode, or an item's own `mode` where it has one (as the kubelet)."""
    modes = {item["path"]: int(item["mode"]) for item in items or [] if item.get("mode") is not None}
    for rel, content in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(modes.get(rel, mode))


def _select(values: Mapping[str, bytes], items: Sequence[Mapping[str, Any]] | None) -> dict[str, bytes]:
    if not items:
        return dict(values)
    return {item["path"]: values[item["key"]] for item in items if item["key"] in values}


class Volumes:
    """The pod's volumes as folders on this machine."""

    def __init__(self, api: Api, pod: Mapping[str, Any], objects: ObjectCache, scratch: Path) -> None:
        self.api, self.pod, self.objects, self.scratch = api, pod, objects, scratch
        self.paths: dict[str, Path] = {}
        self.memory_dirs: list[Path] = []

    def materialise(self) -> dict[str, Path]:
        for volume in self.pod["spec"].get("volumes", []):
            self.paths[volume["name"]] = self._one(volume)
        return self.paths

    def _dir(self, name: str) -> Path:
        path = self.scratch / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
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
            items = source.get("items")
            _write_files(path, _select(values, items), source.get("defaultMode", 0o644), items)
            return path
        if "emptyDir" in volume:
            if volume["emptyDir"].get("medium") == "Memory" and Path("/dev/shm").is_dir():
                path = Path("/dev/shm") / f"fto-{self.pod['metadata']['uid']}-{name}"
                path.mkdir(exist_ok=True)
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
        raise PodError(f"volume {name}: type {kinds} is not supported by the node agent")

    def _claim_path(self, claim: str) -> Path:
        namespace = self.pod["metadata"]["namespace"]
        pvc = self.api.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}") or {}
        volume_name = pvc.get("spec", {}).get("volumeName")
        if not volume_name or pvc.get("status", {}).get("phase") != "Bound":
            raise PodError(f"PersistentVolumeClaim {namespace}/{claim} is not bound")
        pv = self.api.get(f"/api/v1/persistentvolumes/{volume_name}") or {"spec": {}}
        local = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not local:
            raise PodError(
                f"PersistentVolume {volume_name} is neither hostPath nor local: its data is not here"
            )
        path = Path(local["path"])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _downward(self, path: Path, items: Sequence[Mapping[str, Any]], mode: int | None) -> None:
        files = {}
        for item in items:
            if "fieldRef" not in item:
                raise PodError(f"downwardAPI item {item.get('path')}: only fieldRef is supported")
            files[item["path"]] = field_value(self.pod, item["fieldRef"]["fieldPath"]).encode()
        _write_files(path, files, mode or 0o644, items)

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
                _write_files(path, _select(values, ref.get("items")), mode, ref.get("items"))
            elif "downwardAPI" in source:
                self._downward(path, source["downwardAPI"].get("items", []), mode)
            else:
                raise PodError(f"projected source {sorted(source)} is not supported by the node agent")

    def _token(self, source: Mapping[str, Any]) -> str:
        """A real ServiceAccount token for the pod's ServiceAccount, bound to this pod (TokenRequest API), so
        the process has exactly the pod's own permissions. Not refreshed (the default lifetime is an hour)."""
        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        try:
            answer = self.api.create(
                path, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
            )
        except ApiError as exc:
            raise PodError(f"no token for ServiceAccount {meta['namespace']}/{account}: {exc}") from exc
        return str(answer["status"]["token"])

    def cleanup(self) -> None:
        """Remove what only this pod had: its scratch volumes and memory-backed emptyDirs (never claims or
        hostPaths)."""
        for path in self.memory_dirs:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.scratch / "volumes", ignore_errors=True)


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
                source.mkdir(parents=True, exist_ok=True)  # the kubelet creates a missing subPath as a folder
        mounts.append(Mount(str(source), mount["mountPath"], bool(mount.get("readOnly"))))
    return sorted(mounts, key=lambda m: len(Path(m.target).parts))
