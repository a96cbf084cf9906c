#!/usr/bin/env python3
"""Operator at scale: create N FineTuneJobs (suspended, so no pods dominate) and time until each has all its
children (ServiceAccount, Role, RoleBinding, ConfigMap, Service, PVC) and a status (phase Suspended).

Against the dev cluster (`python -m hack.devcluster up`; started here if needed) or $KUBECONFIG with
FTO_USE_EXISTING_CLUSTER=1. The same run also times a plain client creating the same children directly
(same builders, as many jobs at a time as the operator has workers, each job's children in parallel as the
operator writes them), so the ratio shows the operator's overhead. The claims use a WaitForFirstConsumer
StorageClass (as kind's and most clouds' defaults do): with the dev cluster's Immediate default, each claim
also costs ~4 writes of volume provisioning and binding by other controllers (counted in the API server's
request metrics), work that is neither the operator's nor the plain client's.
Prints one JSON line: p50_s, p99_s, total_s, direct_total_s, ratio, operator_peak_rss_mb, and context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer_image" / "src")]

import kopf  # noqa: E402
from hack import devcluster  # noqa: E402

from finetune_operator.api.finetunejob import parse_finetunejob  # noqa: E402
from finetune_operator.builders import build_children  # noqa: E402
from finetune_operator.config import OperatorConfig  # noqa: E402
from finetune_operator.k8s import ApiError, KubeClient, resource_path  # noqa: E402

CHILD_KINDS = [
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "PersistentVolumeClaim"),
]
FTJ = ("finetune.dev/v1alpha1", "FineTuneJob")


def devcluster_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hack.devcluster", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def kubeconfig() -> str:
    if os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1":
        return os.environ["KUBECONFIG"]
    devcluster_cli("up")
    return devcluster_cli("kubeconfig").strip().splitlines()[-1]


def manifest(name: str, storage_class: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "model": {"source": "file:///models/tiny"},
            "dataset": {"source": "file:///data/tiny.jsonl"},
            "distributed": {"nodes": 1, "gpusPerNode": 1},
            "scheduling": {"suspend": True},
        },
    }
    if storage_class:
        body["spec"]["checkpointing"] = {"storage": {"storageClassName": storage_class}}
    return body


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bounded(concurrency: int, coros: list[Any]) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def run(coro: Any) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(run(c) for c in coros))


class Observer:
    """Watches a namespace's FineTuneJobs (full objects) and our children (metadata only) and notes when
    each job is complete: all six children seen and, when `needs_status`, phase Suspended. Both runs are
    timed by the same observer, so each carries the same cost of being watched."""

    def __init__(self, client: KubeClient, namespace: str, count: int, needs_status: bool) -> None:
        self.client, self.namespace, self.count, self.needs_status = client, namespace, count, needs_status
        self.started: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.seen: dict[str, set[str]] = {}
        self.suspended: set[str] = set()
        self.all_done = asyncio.Event()
        self.watchers: list[asyncio.Task[None]] = []

    def start(self, name: str) -> None:
        self.started[name] = time.perf_counter()
        self.check(name)

    def check(self, owner: str) -> None:
        if owner in self.done or owner not in self.started:
            return
        if len(self.seen.get(owner, ())) == len(CHILD_KINDS) and (
            owner in self.suspended or not self.needs_status
        ):
            self.done[owner] = time.perf_counter()
            if len(self.done) == self.count:
                self.all_done.set()

    def observe(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "FineTuneJob":
            owner = obj["metadata"]["name"]
            if (obj.get("status") or {}).get("phase") == "Suspended":
                self.suspended.add(owner)
        else:
            owner = obj["metadata"]["labels"]["finetune.dev/job"]
            self.seen.setdefault(owner, set()).add(kind)
        self.check(owner)

    async def watch(self, api_version: str, kind: str) -> None:
        """List, then watch from the list's version; again whenever the server ends the stream (it does
        when a CRD is re-applied, e.g. by tests running at the same time). Children are watched as
        metadata only: the measuring costs the API server and this process as little as it can."""
        child = kind != "FineTuneJob"
        selector = "finetune.dev/job" if child else None
        path = resource_path(api_version, kind, self.namespace)
        while True:
            page = await self.client.request(
                "GET", path, params={"labelSelector": selector} if selector else None
            )
            for obj in page.get("items") or []:
                self.observe(kind, obj)
            version = page["metadata"]["resourceVersion"]
            with contextlib.suppress(ApiError):
                async for event in self.client.watch(
                    api_version,
                    kind,
                    self.namespace,
                    label_selector=selector,
                    resource_version=version,
                    metadata_only=child,
                ):
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self.observe(kind, event["object"])

    async def __aenter__(self) -> Observer:
        kinds = [FTJ, *CHILD_KINDS] if self.needs_status else CHILD_KINDS
        self.watchers = [asyncio.create_task(self.watch(*k), name=k[1]) for k in kinds]
        await asyncio.sleep(1.0)  # let the watches open before anything is created
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.watchers:
            task.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)

    async def wait(self) -> None:
        try:
            await asyncio.wait_for(self.all_done.wait(), timeout=max(120.0, self.count * 0.6))
        except TimeoutError:
            missing = sorted(set(self.started) - set(self.done))[:5]
            detail = {m: (m in self.suspended, sorted(self.seen.get(m, ()))) for m in missing}
            dead = [(t.get_name(), repr(t.exception())) for t in self.watchers if t.done()]
            raise RuntimeError(
                f"{len(self.done)}/{self.count} converged; e.g. {detail}; ended watches: {dead}"
            ) from None

    def latencies(self) -> list[float]:
        return [self.done[name] - self.started[name] for name in self.started]


async def operator_run(
    client: KubeClient, namespace: str, count: int, concurrency: int, storage_class: str | None
) -> tuple[list[float], float]:
    async with Observer(client, namespace, count, needs_status=True) as observer:

        async def create(name: str) -> None:
            body = manifest(name, storage_class)
            observer.start(name)
            await client.create({**body, "metadata": {"name": name, "namespace": namespace}})

        started = time.perf_counter()
        await bounded(concurrency, [create(f"bench-{i:04d}") for i in range(count)])
        await observer.wait()
        return observer.latencies(), time.perf_counter() - started


async def direct_run(
    client: KubeClient, namespace: str, count: int, workers: int, storage_class: str | None
) -> float:
    """The same children from a plain client, the way the operator's workers write them: `workers` jobs at
    a time, each job's children applied (server-side apply) in parallel; timed, like the operator's run,
    until the observer has seen every child."""
    config = OperatorConfig.from_env()

    async with Observer(client, namespace, count, needs_status=False) as observer:

        async def create_children(index: int) -> None:
            name = f"bench-{index:04d}"
            body = manifest(name, storage_class)
            body["metadata"].update(namespace=namespace, uid=f"00000000-0000-4000-8000-{index:012d}")
            children = build_children(parse_finetunejob(body), config)
            for child in children:
                child["metadata"].pop("ownerReferences")  # no owner exists here; GC would remove them
            observer.start(name)
            await asyncio.gather(*(client.apply(child) for child in children))

        started = time.perf_counter()
        await bounded(workers, [create_children(i) for i in range(count)])
        await observer.wait()
        return time.perf_counter() - started


def kubectl(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "hack.devcluster", "kubectl", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def start_operator(namespace: str, log_path: str, workers: int) -> subprocess.Popen[bytes]:
    health, metrics = devcluster.free_port(), devcluster.free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image" / "src")]),
    }
    env["FTO_WORKERS"] = str(workers)
    with open(log_path, "wb") as log:
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "finetune_operator",
                "--namespace",
                namespace,
                "--health-port",
                str(health),
                "--metrics-port",
                str(metrics),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2)
            return operator
        if operator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"operator did not start; see {log_path}")
        time.sleep(0.5)


def control_plane_pids() -> list[int]:
    """The dev cluster's etcd, API server, controller manager and scheduler (none on an existing cluster)."""
    if os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1":
        return []
    state = devcluster.State.load(devcluster.Layout.default())
    if state is None:
        return []
    names = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
    return [p.pid for p in state.processes if p.name in names]


async def settle(
    pids: list[int], *, quiet_cores: float = 0.3, window: float = 1.0, patience: float = 20.0
) -> float:
    """Wait until `pids` together use under `quiet_cores` CPUs for a whole `window`, so that what an earlier
    step set off (the API server rebuilding its OpenAPI document after the CRDs were applied, the operator's
    start, the endpoints controller catching up with the last run's Services) is billed to neither run.
    Returns the seconds waited; on an existing cluster (no pids to read) it just waits `window`."""
    started = time.monotonic()
    if not pids:
        await asyncio.sleep(window)
        return window
    while time.monotonic() - started < patience:
        before = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(window)
        if (sum(cpu_seconds(p) for p in pids) - before) / window < quiet_cores:
            break
    return time.monotonic() - started


async def measure(
    args: argparse.Namespace, ns_op: str, ns_direct: str, pid: int, workers: int
) -> dict[str, Any]:
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    client = KubeClient.from_connection_info(info, pool=args.concurrency + workers * len(CHILD_KINDS))
    quiet = [pid, *control_plane_pids()]
    try:
        settled = await settle(quiet)
        cpu_before, own_before = cpu_seconds(pid), cpu_seconds(os.getpid())
        latencies, total = await operator_run(client, ns_op, args.count, args.concurrency, args.storage_class)
        rss = peak_rss_mb(pid)
        cpu = cpu_seconds(pid) - cpu_before
        own_cpu = cpu_seconds(os.getpid()) - own_before
        settled_direct = await settle(quiet)
        direct_total = await direct_run(client, ns_direct, args.count, workers, args.storage_class)
    finally:
        await client.close()
    latencies.sort()
    return {
        "benchmark": "operator_scale",
        "count": args.count,
        "concurrency": args.concurrency,
        "operator_workers": workers,
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "max_s": round(latencies[-1], 3),
        "total_s": round(total, 3),
        "direct_total_s": round(direct_total, 3),
        "ratio": round(total / direct_total, 3),
        "operator_peak_rss_mb": round(rss, 1),
        "operator_cpu_s": round(cpu, 1),
        "benchmark_client_cpu_s": round(own_cpu, 1),
        "cpus": os.cpu_count(),
        "children_per_job": len(CHILD_KINDS),
        "storage_class": args.storage_class,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "settle_s": [round(settled, 1), round(settled_direct, 1)],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["KUBECONFIG"] = kubeconfig()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    suffix = secrets.token_hex(3)
    ns_op, ns_direct = f"bench-operator-{suffix}", f"bench-direct-{suffix}"
    for ns in (ns_op, ns_direct):
        kubectl("create", "namespace", ns)
    workers = args.workers or OperatorConfig.from_env().workers
    operator = start_operator(ns_op, args.operator_log, workers)
    try:
        return asyncio.run(measure(args, ns_op, ns_direct, operator.pid, workers))
    finally:
        if not args.keep:
            # The operator is still up, so it releases its finalizers while the namespaces go.
            with contextlib.suppress(subprocess.CalledProcessError):
                kubectl("delete", "namespace", ns_op, ns_direct, "--timeout=300s")
        operator.terminate()
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="FineTuneJobs to create")
    parser.add_argument("--concurrency", type=int, default=16, help="parallel FineTuneJob creates")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="the operator's workers (FTO_WORKERS) and the plain client's jobs at a time (default: the "
        "operator's default)",
    )
    parser.add_argument(
        "--storage-class",
        default=None if os.environ.get("FTO_USE_EXISTING_CLUSTER") == "1" else "standard-wffc",
        help="StorageClass of the checkpoint claims (default: the dev cluster's WaitForFirstConsumer class, "
        "as kind's and most clouds' default classes are, so a suspended job's claim isn't provisioned; on "
        "an existing cluster, its default class)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the namespaces afterwards")
    parser.add_argument("--operator-log", default="/tmp/operator_scale.log", help="operator output")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
