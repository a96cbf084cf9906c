#!/usr/bin/env python3
"""A dynamic hostPath volume provisioner for the dev cluster (started by hack/devcluster, components.py).

It plays the external-provisioner half of the PersistentVolume protocol for one StorageClass: for each
pending claim of that class it makes a folder under --volumes-dir and creates a hostPath PersistentVolume
pre-bound to the claim (claimRef); kube-controller-manager's PV binder then binds the pair, as with any
external provisioner. When a claim is deleted and its volume becomes Released (reclaim policy Delete), it
removes the folder and the volume. Pods on the local node (hack/nodeagent) mount the folder; pods on kwok
nodes run nothing, so there the folder is where a test finds (or puts) the volume's contents.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
"""Set on a claim by the scheduler when a pod using it (WaitForFirstConsumer) has been given a node."""
WATCH_TIMEOUT_S = 300


def log(message: str) -> None:
    print(f"[local-provisioner {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Provisioner:
    def __init__(
        self, core: Any, storage: Any, volumes_dir: Path, storage_classes: list[str], name: str
    ) -> None:
        self.core = core
        self.storage = storage
        self.volumes_dir = volumes_dir
        self.storage_classes = storage_classes
        self.name = name
        self._waits: dict[str, bool] = {}

    def waits_for_consumer(self, storage_class: str) -> bool:
        """Whether the class binds only once a pod uses the claim (read once per class)."""
        if storage_class not in self._waits:
            mode = self.storage.read_storage_class(storage_class).volume_binding_mode
            self._waits[storage_class] = mode == "WaitForFirstConsumer"
        return self._waits[storage_class]

    def volume_path(self, pv_name: str) -> Path:
        return self.volumes_dir / pv_name

    def on_claim(self, pvc: dict[str, Any]) -> None:
        spec, meta = pvc.get("spec") or {}, pvc["metadata"]
        storage_class = spec.get("storageClassName")
        if (
            storage_class not in self.storage_classes
            or spec.get("volumeName")
            or meta.get("deletionTimestamp")
        ):
            return
        if self.waits_for_consumer(storage_class) and not (meta.get("annotations") or {}).get(SELECTED_NODE):
            return  # WaitForFirstConsumer: the scheduler names a node once a pod uses the claim
        pv_name = f"pvc-{meta['uid']}"
        path = self.volume_path(pv_name)
        path.mkdir(parents=True, exist_ok=True)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: self.name}},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes"),
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "storageClassName": storage_class,
                "persistentVolumeReclaimPolicy": "Delete",
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
            },
        }
        try:
            self.core.create_persistent_volume(pv)
        except ApiException as err:
            if err.status != 409:  # already provisioned for this claim
                raise
            return
        log(f"provisioned {pv_name} at {path} for {meta['namespace']}/{meta['name']}")

    def on_volume(self, pv: dict[str, Any]) -> None:
        meta, spec = pv["metadata"], pv.get("spec") or {}
        if (meta.get("annotations") or {}).get(PROVISIONED_BY) != self.name or meta.get("deletionTimestamp"):
            return
        if (pv.get("status") or {}).get("phase") != "Released" or spec.get(
            "persistentVolumeReclaimPolicy"
        ) != "Delete":
            return
        path = Path(spec["hostPath"]["path"])
        if path.parent == self.volumes_dir:  # never remove anything outside our folder
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.core.delete_persistent_volume(meta["name"])
        except ApiException as err:
            if err.status != 404:
                raise
        log(f"deleted released volume {meta['name']}")


def watch_forever(list_func: Callable[..., Any], handle: Callable[[dict[str, Any]], None], what: str) -> None:
    """Watch from the current state (existing objects arrive as ADDED); start again after any error.
    Objects arrive as plain JSON dicts (`deserialize=False`): the client's model classes cost ~1.5 ms of
    CPU an event, which a burst of hundreds of claims (the operator benchmark) would spend here."""
    while True:
        try:
            for event in watch.Watch().stream(  # type: ignore[no-untyped-call]
                list_func, timeout_seconds=WATCH_TIMEOUT_S, deserialize=False
            ):
                if event["type"] in ("ADDED", "MODIFIED"):
                    try:
                        handle(event["object"])
                    except ApiException as err:
                        log(f"{what}: API error {err.status}: {err.reason}")
        except Exception as err:  # the watch restarts; this process must not die on a dropped connection
            log(f"{what} watch ended ({type(err).__name__}: {err}); restarting")
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--volumes-dir", required=True, type=Path)
    parser.add_argument(
        "--storage-class", action="append", required=True, help="a StorageClass to serve (repeatable)"
    )
    parser.add_argument("--provisioner-name", default="finetune.dev/local-hostpath")
    args = parser.parse_args()
    config.load_kube_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    core = client.CoreV1Api()
    volumes_dir = args.volumes_dir.resolve()
    volumes_dir.mkdir(parents=True, exist_ok=True)
    storage = client.StorageV1Api()
    provisioner = Provisioner(core, storage, volumes_dir, args.storage_class, args.provisioner_name)
    log(f"serving StorageClasses {', '.join(args.storage_class)}; volumes under {volumes_dir}")
    threading.Thread(
        target=watch_forever,
        args=(core.list_persistent_volume, provisioner.on_volume, "volumes"),
        daemon=True,
    ).start()
    watch_forever(core.list_persistent_volume_claim_for_all_namespaces, provisioner.on_claim, "claims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
