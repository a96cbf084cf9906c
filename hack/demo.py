#!/usr/bin/env python3
"""`make demo`: one FineTuneJob from `kubectl apply` to a trained model, then served and answering, for real,
on this machine.

    dev cluster (unless FTO_USE_EXISTING_CLUSTER=1) -> CRDs -> the operator -> a tiny model and dataset on a
    claim -> examples/demo/finetunejob.yaml -> admitted, pod Running on the local node, whose agent
    (hack/nodeagent) runs its trainer container here -> Succeeded, metrics before/after, model card ->
    examples/demo/modeldeployment.yaml (the job's artifact, int8-quantised behind the quality gate) -> its
    server pod on the local node -> Ready -> a chat request through the `openai` client, via the Service's
    loopback forwarder and the generated API key -> summary -> operator stopped, cluster and server left up

Everything happens in the namespace `fto-demo` (recreated on each run; FTO_DEMO_NAMESPACE changes it). Files:
.dev/demo/ (operator.log, trainer.log, server.log, assets/; FTO_DEMO_DIR moves it). The cluster keeps running
so you can look around (and call the server); `make cluster-down` stops it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import openai
from openai.types.chat import ChatCompletionMessageParam

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
DEPLOYMENT = "demo"
DEPLOYMENT_MANIFEST = REPO_ROOT / "examples" / "demo" / "modeldeployment.yaml"
READY_TIMEOUT_S = 300
QUESTION = "word: kqzt\nfirst:"  # a prompt of the trained task, whose rule answers "K"
RULE_ANSWER = "K"
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

    def started_pod(self, selector: str, what: str, timeout: float = 180.0) -> dict[str, Any]:
        def started() -> dict[str, Any] | None:
            out = self.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json")
            phases = ("Running", "Succeeded", "Failed")
            pods = [p for p in json.loads(out)["items"] if p["status"].get("phase") in phases]
            return pods[0] if pods else None

        pod: dict[str, Any] = self.wait(what, started, timeout=timeout)
        return pod

    def trainer_pod(self) -> dict[str, Any]:
        return self.started_pod(f"finetune.dev/job={JOB}", "the trainer pod to start")

    def logs_command(self, pod: str) -> list[str]:
        kubectl = [str(self.kube.kubectl_path), f"--kubeconfig={self.kube.kubeconfig}"]
        return [*kubectl, "logs", "-f", pod, "-n", NAMESPACE]

    def follow(self, pod: str, log_path: Path) -> int:
        """`kubectl logs -f` into the log file (the trainer's own messages shown) until the container ends;
        returns its exit code as the pod reports it."""
        with (
            log_path.open("w") as log,
            subprocess.Popen(self.logs_command(pod), stdout=subprocess.PIPE, text=True) as proc,
        ):
            copy_log(proc, log, "finetune_trainer", "trainer")

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
def watch(demo: Demo, resource: str) -> Iterator[None]:
    """Print `kubectl get RESOURCE` whenever a row changes (ignoring the AGE column)."""
    stop = threading.Event()

    last = ""
    header_shown = False

    def poll() -> None:
        nonlocal last, header_shown
        result = demo.kube.kubectl("get", resource, "-n", NAMESPACE, check=False)
        lines = result.stdout.strip().splitlines()
        if len(lines) < 2:
            return
        rows = "\n".join(line.rsplit(None, 1)[0] for line in lines[1:])
        if rows == last:
            return
        if not header_shown:
            print(f"{'':{12 + len(resource)}}{lines[0]}", flush=True)  # under the rows' columns
            header_shown = True
        for line in lines[1:]:
            say(f"{resource}  {line}")
        last = rows

    def loop() -> None:
        while not stop.is_set():
            poll()
            stop.wait(1.0)
        poll()  # the final state

    thread = threading.Thread(target=loop, name=f"watch-{resource}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def copy_log(proc: subprocess.Popen[str], log: IO[str], package: str, label: str) -> None:
    """Copy a `kubectl logs -f` stream into `log` until it ends, showing the package's own lines."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        container_line(line, package, label)


def container_line(line: str, package: str, label: str) -> None:
    """A container's own progress messages (its package's INFO lines), not library noise."""
    if f" INFO {package}" in line:
        say(f"{label} | " + line.split(" INFO ", 1)[1].strip())


def show_conditions(conditions: list[dict[str, Any]], kinds: tuple[str, ...]) -> None:
    by_type = {c["type"]: c for c in conditions}
    for kind in kinds:
        if kind in by_type:
            c = by_type[kind]
            say(f"condition {kind}={c['status']} ({c.get('reason')}): {c.get('message', '')}")


def show_result(demo: Demo, pod: dict[str, Any]) -> None:
    job = demo.get("finetunejob", JOB)
    assert job is not None
    status = job["status"]
    step(f"FineTuneJob {NAMESPACE}/{JOB}: {status.get('phase')}")
    show_conditions(status.get("conditions", []), ("Admitted", "Running", "Succeeded", "Failed"))
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


# ----------------------------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class Served:
    """What the serving part found: where a user calls the server, with which key, and what it answered."""

    deployment: dict[str, Any]  # the ModelDeployment once Ready
    service: str
    url: str  # the Service's loopback forwarder on this machine, http://127.0.0.1:PORT
    model: str  # the served model's name, as /v1/models lists it
    answer: str
    health: dict[str, Any]  # the server's /v2/health/ready answer, through the Service


@contextlib.contextmanager
def following(demo: Demo, pod: str, log_path: Path, package: str, label: str) -> Iterator[None]:
    """`kubectl logs -f POD` into `log_path` in the background while the block runs (a server's log does not
    end), showing the package's own INFO lines."""
    with (
        log_path.open("w") as log,
        subprocess.Popen(demo.logs_command(pod), stdout=subprocess.PIPE, text=True) as proc,
    ):
        thread = threading.Thread(
            target=copy_log, args=(proc, log, package, label), name=f"logs-{label}", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            proc.terminate()
            thread.join(5)


def http_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET on loopback (no proxy), any status: the health endpoints answer 503 with a body too."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read())
    return body


def serve(demo: Demo) -> Served | None:
    """Apply the ModelDeployment, follow its server until Ready, then call it as a user does: the generated
    API key from its Secret, the Service through its loopback forwarder, the official `openai` client.
    None (having said why) when it does not get Ready."""
    with watch(demo, "mdep"):
        step(f"kubectl apply -f {DEPLOYMENT_MANIFEST.relative_to(REPO_ROOT)}")
        demo.kubectl("apply", "-n", NAMESPACE, "-f", str(DEPLOYMENT_MANIFEST))
        pod = demo.started_pod(f"finetune.dev/deployment={DEPLOYMENT}", "the server pod to start")
        name = pod["metadata"]["name"]
        say(f"pod {name} on node {pod['spec']['nodeName']}, IP {pod['status'].get('podIP')}")
        step(f"the node agent runs its server container here; kubectl logs -f {name}")
        container = pod["spec"]["containers"][0]
        say(f"command: {' '.join(container.get('command', []) + container.get('args', []))}")
        with following(demo, name, WORK_DIR / "server.log", "finetune_server", "server"):
            wait = ["wait", "--for=condition=Ready", f"modeldeployment/{DEPLOYMENT}"]
            step(f"kubectl {' '.join(wait)} --timeout={READY_TIMEOUT_S}s")
            waited = demo.kube.kubectl(
                *wait,
                "-n",
                NAMESPACE,
                f"--timeout={READY_TIMEOUT_S}s",
                check=False,
                timeout=READY_TIMEOUT_S + 30,
            )
    deployment = demo.get("modeldeployment", DEPLOYMENT)
    assert deployment is not None
    status = deployment.get("status", {})
    ready = waited.returncode == 0
    step(f"ModelDeployment {NAMESPACE}/{DEPLOYMENT}: {'Ready' if ready else 'not Ready'}")
    show_conditions(
        status.get("conditions", []), ("ModelReady", "Available", "Progressing", "Degraded", "Ready")
    )
    if not ready:
        say(f"kubectl wait: {waited.stderr.strip()}; the server's log: {WORK_DIR / 'server.log'}")
        return None

    secret_name = status["apiKeySecret"]
    secret = demo.kube.kubectl_json("get", "secret", secret_name, "-n", NAMESPACE)
    api_key = base64.b64decode(secret["data"]["api-keys"]).decode().split()[0]
    say(f"API key: the first line of Secret {secret_name} (status.apiKeySecret), key api-keys")
    service = (urllib.parse.urlsplit(status["endpoint"]).hostname or "").split(".")[0]
    port = demo.kube.kubectl_json("get", "service", service, "-n", NAMESPACE)["spec"]["ports"][0]["name"]
    key = f"{NAMESPACE}/{service}:{port}"
    url: str = demo.wait(
        f"the loopback forwarder of Service port {key} (`python -m hack.devcluster services`; on a cluster "
        f"without the dev cluster's local node: kubectl port-forward service/{service} -n {NAMESPACE})",
        lambda: devcluster.Layout.default().service_forwarders().get(key),
        timeout=60,
    )
    say(f"Service {service} (in the cluster {status['endpoint']}) at {url} on this machine: its forwarder")
    health = http_json(f"{url}/v2/health/ready")

    step("a chat request through the official openai client")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=2, timeout=60)
    model = client.models.list().data[0].id
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    say(f"client.chat.completions.create(model={model!r}, messages={messages!r}, max_tokens=4)")
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    answer = reply.choices[0].message.content or ""
    tokens = reply.usage.completion_tokens if reply.usage else "?"
    say(f"answer: {answer!r} ({tokens} tokens, finish_reason {reply.choices[0].finish_reason})")
    if answer.strip() != RULE_ANSWER:
        say(f"(the task's rule answers {RULE_ANSWER!r}; a 2-layer model trained a minute on a CPU guesses)")
    return Served(deployment, service, url, model, answer, health)


def quantization_figures(served: Served) -> tuple[dict[str, Any] | None, str]:
    """The quality gate's measurement of quantisation, and where it came from: the ModelDeployment's status
    when the operator could read it from the server, else the server's readiness answer through the
    Service (the operator outside the pod network sees only the pod's Ready condition)."""
    from_status = served.deployment.get("status", {}).get("quantization")
    if from_status and from_status.get("qualityDrop") is not None:
        return from_status, "ModelDeployment status.quantization"
    measured = [r for r in served.health.get("quality", []) if r.get("step") == "quantization"]
    source = (
        f"the server's /v2/health/ready through Service {served.service}: the ModelDeployment's status has "
        "no figures, its operator runs outside the pod network"
    )
    return (measured[0] if measured else None), source


def megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.2f} MB"


def show_summary(job: dict[str, Any], served: Served) -> None:
    step("summary")
    metrics = job["status"].get("metrics") or {}
    before, after = metrics.get("before", {}), metrics.get("after", {})
    figures = ", ".join(
        f"{name} {before[name]:.4f} -> {after[name]:.4f}" for name in sorted(before) if name in after
    )
    print(f"    training     {figures}")
    print(
        "                 (base model -> fine-tuned model on held-out data; from FineTuneJob status.metrics)"
    )
    quantization, source = quantization_figures(served)
    if quantization is None:
        print("    compression  none measured (the server's readiness answer has no quality gate result)")
    else:
        size, original = quantization.get("sizeBytes"), quantization.get("originalSizeBytes")
        smaller = f" ({original / size:.1f}x smaller)" if size and original else ""
        print(
            f"    compression  {quantization['method']}: {megabytes(original)} -> {megabytes(size)}{smaller}"
        )
        print(
            f"                 {quantization['metric']} {quantization['baseline']:.4f} -> "
            f"{quantization['value']:.4f}: quality drop {quantization['qualityDrop']:.2%} "
            f"(max {quantization['maxQualityDrop']:.2%})"
        )
        print(f"                 (from {source})")
    print(f"    answer       {QUESTION!r} -> {served.answer!r} (openai client, model {served.model!r})")
    status = served.deployment["status"]
    print(f"    endpoint     in the cluster: {status['endpoint']} (status.endpoint)")
    print(
        f"                 on this machine: {served.url}/v1 (Service {served.service}'s loopback forwarder)"
    )
    secret = status["apiKeySecret"]
    print(
        f"    API key      export KEY=$(kubectl get secret {secret} -n {NAMESPACE} "
        "-o jsonpath='{.data.api-keys}' | base64 -d)"
    )
    body = json.dumps(
        {"model": served.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    )
    print(
        f'    curl         curl -s {served.url}/v1/chat/completions -H "Authorization: Bearer $KEY" '
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    print(f'    openai       client = openai.OpenAI(base_url="{served.url}/v1", api_key=os.environ["KEY"])')
    messages = json.dumps([{"role": "user", "content": QUESTION}])
    print(f'                 client.chat.completions.create(model="{served.model}", messages={messages})')


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
    print(
        "finetune-operator demo: a FineTuneJob from `kubectl apply` to a trained model, served and "
        "answering, on this machine"
    )
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

        with watch(demo, "ftj"):
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
        served = serve(demo) if succeeded else None
    finally:
        maker.join()
        step("stopping the operator (the cluster and the server keep running)")
        operator.stop()

    if served is not None:
        show_summary(final, served)
    bin_dir = kube.kubectl_path.parent
    step(f"done in {time.monotonic() - STARTED:.0f}s. Look around:")
    print(f"    export KUBECONFIG={kubeconfig} PATH={bin_dir}:$PATH")
    print(f"    kubectl get ftj,mdep -n {NAMESPACE}   # or: python -m hack.devcluster kubectl get mdep -A")
    print(f"    kubectl describe ftj {JOB} -n {NAMESPACE}")
    print(f"    kubectl get ftj {JOB} -n {NAMESPACE} -o jsonpath='{{.status.metrics}}'")
    print(f"    kubectl describe mdep {DEPLOYMENT} -n {NAMESPACE}")
    print("    .venv/bin/python -m hack.devcluster services   # each Service's address on this machine")
    print("    make run                                   # the operator again, in the foreground")
    print("    make cluster-down                          # stop the dev cluster")
    if not succeeded:
        logs = f"{WORK_DIR / 'trainer.log'} and {WORK_DIR / 'operator.log'}"
        print(f"\nthe FineTuneJob did not succeed; see {logs}")
        return 1
    if served is None:
        logs = f"{WORK_DIR / 'server.log'} and {WORK_DIR / 'operator.log'}"
        print(f"\nthe ModelDeployment did not get Ready; see {logs}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
