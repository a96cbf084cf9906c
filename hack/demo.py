#!/usr/bin/env python3
"""`make demo`: one FineTuneJob from `kubectl apply` to a trained model, for real, on this machine.

    dev cluster (unless FTO_USE_EXISTING_CLUSTER=1) -> CRDs -> the operator -> a tiny model and dataset on a
    claim -> examples/demo/finetunejob.yaml -> admitted, pod Running on the local node, whose agent
    (hack/nodeagent) runs its trainer container here -> Succeeded, metrics before/after, model card ->
    operator stopped, cluster left up

Everything happens in the namespace `fto-demo` (recreated on each run; FTO_DEMO_NAMESPACE changes it). Files:
.dev/demo/ (operator.log, trainer.log, assets/; FTO_DEMO_DIR moves it). The cluster keeps running so you can
look around; `make cluster-down` stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from hack import devcluster, nodeagent  # noqa: E402
from hack.kube import Kube  # noqa: E402
from hack.make_tiny_model import make_tiny_assets  # noqa: E402
from hack.operator_process import OperatorProcess  # noqa: E402  (the same operator launcher the tests use)

NAMESPACE = os.environ.get("FTO_DEMO_NAMESPACE", "fto-demo")
JOB = "demo"
ASSETS_CLAIM = "demo-assets"
MANIFEST = REPO_ROOT / "examples" / "demo" / "finetunejob.yaml"
WORK_DIR = Path(os.environ.get("FTO_DEMO_DIR", str(REPO_ROOT / ".dev" / "demo")))
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


class Demo:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.kube.kubectl(*args, input=input).stdout

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.kube.find(kind, name, NAMESPACE)

    def wait(self, what: str, check: Any, timeout: float = 180.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    # ------------------------------------------------------------------------------------------- steps

    def apply_crds(self) -> None:
        step("applying the CRDs (crds/)")
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=fto-demo",
            "-f",
            str(REPO_ROOT / "crds"),
        )
        names = [p.stem for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        say(f"established: {', '.join(names)}")

    def fresh_namespace(self, operator: OperatorProcess) -> None:
        if self.kube.find("namespace", NAMESPACE) is not None:
            say(f"removing the previous demo's namespace {NAMESPACE}")
            # While the operator runs, so that it releases its finalizer.
            self.kubectl("delete", "finetunejobs", "--all", "-n", NAMESPACE, "--timeout=60s")
            self.kubectl("delete", "namespace", NAMESPACE, "--timeout=120s")
        self.kubectl("create", "namespace", NAMESPACE)
        self.wait("the namespace's default ServiceAccount", lambda: self.get("serviceaccount", "default"))
        say(f"namespace {NAMESPACE} ready")

    def create_assets_claim(self) -> None:
        """A claim for the base model and data, as a user would upload them; the job reads pvc:// sources."""
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": ASSETS_CLAIM, "namespace": NAMESPACE},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(claim))

    def put_assets(self, assets_dir: Path) -> None:
        pvc = self.wait(
            f"claim {ASSETS_CLAIM} to be bound",
            lambda: (c := self.get("pvc", ASSETS_CLAIM)) and c["status"].get("phase") == "Bound" and c,
        )
        pv = self.kube.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
        folder = Path(pv["spec"]["hostPath"]["path"])
        shutil.copytree(assets_dir / "model", folder / "model", dirs_exist_ok=True)
        shutil.copy2(assets_dir / "data.jsonl", folder / "data.jsonl")
        say(f"copied model/ and data.jsonl onto claim {ASSETS_CLAIM} (volume {folder})")

    def trainer_pod(self) -> dict[str, Any]:
        def started() -> dict[str, Any] | None:
            out = self.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"finetune.dev/job={JOB}", "-o", "json")
            phases = ("Running", "Succeeded", "Failed")
            pods = [p for p in json.loads(out)["items"] if p["status"].get("phase") in phases]
            return pods[0] if pods else None

        pod: dict[str, Any] = self.wait("the trainer pod to start", started)
        return pod

    def follow(self, pod: str, log_path: Path) -> int:
        """`kubectl logs -f` into the log file (the trainer's own messages shown) until the container ends;
        returns its exit code as the pod reports it."""
        cmd = [str(self.kube.kubectl_path), f"--kubeconfig={self.kube.kubeconfig}", "logs", "-f", pod]
        with (
            log_path.open("w") as log,
            subprocess.Popen([*cmd, "-n", NAMESPACE], stdout=subprocess.PIPE, text=True) as proc,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                trainer_line(line)

        def ended() -> dict[str, Any] | None:
            current = self.get("pod", pod)
            phase = (current or {}).get("status", {}).get("phase")
            return current if phase in ("Succeeded", "Failed") else None

        final = self.wait(f"pod {pod} to end", ended, timeout=600)
        [status] = final["status"]["containerStatuses"]
        return int(status["state"]["terminated"]["exitCode"])

    def require_local_node(self) -> None:
        selector = ",".join(f"{k}={v}" for k, v in nodeagent.NODE_SELECTOR.items())
        nodes = json.loads(self.kubectl("get", "nodes", "-l", selector, "-o", "json"))["items"]
        if not nodes:
            raise SystemExit(
                f"demo: no node labelled {selector} in this cluster: the example job runs on the dev "
                "cluster's local node (see docs/dev-cluster.md)"
            )
        say(f"local node {nodes[0]['metadata']['name']}: its pods run on this machine")


@contextlib.contextmanager
def watch_finetunejobs(demo: Demo) -> Iterator[None]:
    """Print `kubectl get ftj` whenever a row changes (ignoring the AGE column)."""
    stop = threading.Event()

    last = ""
    header_shown = False

    def poll() -> None:
        nonlocal last, header_shown
        result = demo.kube.kubectl("get", "ftj", "-n", NAMESPACE, check=False)
        lines = result.stdout.strip().splitlines()
        if len(lines) < 2:
            return
        rows = "\n".join(line.rsplit(None, 1)[0] for line in lines[1:])
        if rows == last:
            return
        if not header_shown:
            print(f"           {lines[0]}", flush=True)
            header_shown = True
        for line in lines[1:]:
            say(f"ftj  {line}")
        last = rows

    def loop() -> None:
        while not stop.is_set():
            poll()
            stop.wait(1.0)
        poll()  # the final state

    thread = threading.Thread(target=loop, name="watch-ftj", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def trainer_line(line: str) -> None:
    """The trainer's own progress messages (its INFO lines), not library noise."""
    if " INFO finetune_trainer" in line:
        say("trainer | " + line.split(" INFO ", 1)[1].strip())


def show_result(demo: Demo, pod: dict[str, Any]) -> None:
    job = demo.get("finetunejob", JOB)
    assert job is not None
    status = job["status"]
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    step(f"FineTuneJob {NAMESPACE}/{JOB}: {status.get('phase')}")
    for kind in ("Admitted", "Running", "Succeeded", "Failed"):
        if kind in conditions:
            c = conditions[kind]
            say(f"condition {kind}={c['status']} ({c.get('reason')}): {c.get('message', '')}")
    metrics = status.get("metrics") or {}
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if before or after:
        say("metrics (base model -> fine-tuned model, held-out data):")
        for name in sorted(set(before) | set(after)):
            b, a = before.get(name), after.get(name)
            say(
                f"    {name:<11} {b if b is None else f'{b:.4f}':>10} -> {a if a is None else f'{a:.4f}':>10}"
            )
    artifact = status.get("artifact") or {}
    if artifact:
        say(f"artifact: {artifact.get('uri')} ({artifact.get('format')}, {artifact.get('sizeBytes')} bytes)")
        for label, key in (("model", "uri"), ("model card", "modelCard")):
            local = local_path(demo, pod, artifact.get(key) or "")
            if local:
                say(f"{label} on this machine: {local}")
        card = local_path(demo, pod, artifact.get("modelCard") or "")
        if card:
            for png in sorted(card.parent.glob("*.png")):
                say(f"loss curve: {png}")


def local_path(demo: Demo, pod: dict[str, Any], container_path: str) -> Path | None:
    """A path inside the trainer pod, or a `pvc://claim/path` URI (what status.artifact reports), as a path
    on this machine (via the claim's PersistentVolume)."""
    if container_path.startswith("pvc://"):
        claim_name, _, rest = container_path.removeprefix("pvc://").partition("/")
        pvc = demo.kube.kubectl_json("get", "pvc", claim_name, "-n", NAMESPACE)
        pv = demo.kube.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
        return Path(pv["spec"]["hostPath"]["path"]) / rest
    [container] = pod["spec"]["containers"]
    mounts = [
        m for m in container["volumeMounts"] if container_path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    if "persistentVolumeClaim" not in volume:
        return None
    claim = demo.kube.kubectl_json(
        "get", "pvc", volume["persistentVolumeClaim"]["claimName"], "-n", NAMESPACE
    )
    pv = demo.kube.kubectl_json("get", "pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"]) / container_path.removeprefix(mount["mountPath"]).lstrip("/")


def cluster_up() -> Path:
    layout = devcluster.Layout.default()
    if devcluster.use_existing_cluster():
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            raise SystemExit("demo: FTO_USE_EXISTING_CLUSTER=1 needs KUBECONFIG")
        step(f"using the existing cluster in {kubeconfig}")
        return Path(kubeconfig)
    step("dev cluster (python -m hack.devcluster up; first start builds nothing if `make setup` ran)")
    subprocess.run(devcluster.command("up"), cwd=REPO_ROOT, check=True)
    return layout.kubeconfig


def main() -> int:
    print("finetune-operator demo: a FineTuneJob from `kubectl apply` to a trained model, on this machine")
    why_not = None if devcluster.use_existing_cluster() else nodeagent.cannot_run_pods()
    if why_not is not None:
        # Checked first, not after minutes of setup: the trainer pod runs in namespaces of its own.
        print(
            f"demo: can't run the trainer pod here: {why_not} (see docs/demo.md); "
            "`make test` and `make cluster-up` do not need this",
            file=sys.stderr,
        )
        return 1
    kubeconfig = cluster_up()
    os.environ["KUBECONFIG"] = str(kubeconfig)
    kube = Kube(kubeconfig, devcluster.tools_dir(devcluster.Layout.default()) / "kubectl")
    demo = Demo(kube)
    demo.require_local_node()
    demo.apply_crds()
    WORK_DIR.mkdir(parents=True, exist_ok=True)

    step(f"starting the operator: python -m finetune_operator --namespace {NAMESPACE}")
    say(f"its log: {WORK_DIR / 'operator.log'}")
    (WORK_DIR / "operator.log").unlink(missing_ok=True)
    operator = OperatorProcess(NAMESPACE, kubeconfig, WORK_DIR / "operator.log")
    assets: dict[str, Path] = {}
    maker = threading.Thread(
        target=lambda: assets.update(dir=make_tiny_assets(WORK_DIR / "assets").model_dir.parent)
    )
    maker.start()  # the tiny model is made while the operator starts
    try:
        operator.start()
        say(f"operator healthy at {operator.health_url}; metrics at {operator.metrics_url}")
        demo.fresh_namespace(operator)
        demo.create_assets_claim()

        step(
            "a tiny causal LM (2-layer Llama, char tokenizer) and a generated task (hack/make_tiny_model.py)"
        )
        maker.join()
        say(f"made {assets['dir']}/model and {assets['dir']}/data.jsonl")
        demo.put_assets(assets["dir"])

        with watch_finetunejobs(demo):
            step(f"kubectl apply -f {MANIFEST.relative_to(REPO_ROOT)}")
            demo.kubectl("apply", "-n", NAMESPACE, "-f", str(MANIFEST))
            pod = demo.trainer_pod()
            name = pod["metadata"]["name"]
            say(f"pod {name} on node {pod['spec']['nodeName']}, IP {pod['status'].get('podIP')}")
            step(f"the node agent runs its trainer container here; kubectl logs -f {name}")
            container = pod["spec"]["containers"][0]
            say(f"command: {' '.join(container['command'] + container['args'])}")
            exit_code = demo.follow(name, WORK_DIR / "trainer.log")
            say(f"trainer exited with code {exit_code} (log {WORK_DIR / 'trainer.log'}); the pod ended so")
            final = demo.wait(
                "the FineTuneJob to finish",
                lambda: (
                    (j := demo.get("finetunejob", JOB))
                    and j["status"].get("phase") in ("Succeeded", "Failed")
                    and j
                ),
                timeout=120,
            )
        show_result(demo, pod)
        succeeded = final["status"]["phase"] == "Succeeded"
    finally:
        maker.join()
        step("stopping the operator (the cluster keeps running)")
        operator.stop()

    bin_dir = kube.kubectl_path.parent
    step(f"done in {time.monotonic() - STARTED:.0f}s. Look around:")
    print(f"    export KUBECONFIG={kubeconfig} PATH={bin_dir}:$PATH")
    print(
        f"    kubectl get ftj -n {NAMESPACE}    # or: .venv/bin/python -m hack.devcluster kubectl get ftj -A"
    )
    print(f"    kubectl describe ftj {JOB} -n {NAMESPACE}")
    print(f"    kubectl get ftj {JOB} -n {NAMESPACE} -o jsonpath='{{.status.metrics}}'")
    print("    make run                                   # the operator again, in the foreground")
    print("    make cluster-down                          # stop the dev cluster")
    if not succeeded:
        logs = f"{WORK_DIR / 'trainer.log'} and {WORK_DIR / 'operator.log'}"
        print(f"\nthe FineTuneJob did not succeed; see {logs}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
