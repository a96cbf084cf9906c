"""Every task other than causal LM through the operator on the dev cluster: a FineTuneJob per task, applied
together, each admitted by the operator, trained by its pod on the local node (the trainer, run by the node's
agent as a process here) and ending Succeeded with an artifact and the task's metrics before and after.

The data and models are the trainer tests' own (written by this test, nothing downloaded): topic sentences
on the real all-MiniLM-L6-v2 encoder, scikit-learn's digits as PNG folders on a tiny ResNet, COCO shapes on an
FCOS detector folder, planted interactions on a matrix-factorisation definition. The jobs are small — the
trainer tests show quality; this shows the path (rendered config, mounts, file sources, status, export)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hack import nodeagent

from tests.e2e.test_lifecycle import condition, exit_code, get_job, running_trainer_pod, trainer_log
from tests.kube_helpers import Cluster, OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("local_node")]

REPO = Path(__file__).resolve().parents[2]
TRAINER_TESTS = REPO / "trainer_image" / "tests"
#: The trainer pods' PYTHONPATH: this checkout's trainer (the local node's `python` imports the main
#: checkout's otherwise), carried by the Secret that `spec.credentialsSecret` puts in the pods' environment.
CHECKOUT_SECRET = "this-checkout"


def trainer_fixture(name: str) -> ModuleType:
    """A data/model helper module of the trainer's tests (trainer_image/tests is not a package)."""
    if str(TRAINER_TESTS) not in sys.path:
        sys.path.append(str(TRAINER_TESTS))
    return importlib.import_module(name)


@dataclass(frozen=True)
class TaskJob:
    task: str
    #: The metric that must be better after training than before (status.metrics.after vs before).
    metric: str
    #: Whether better is higher (accuracy, recall) or lower (loss).
    higher: bool
    #: Writes the model and the data under the folder; returns the spec's model, dataset and the rest.
    make: Callable[[Path], dict[str, Any]]

    def better(self, before: float, after: float) -> bool:
        return after > before if self.higher else after < before


def sequence_classification(root: Path) -> dict[str, Any]:
    sentences = trainer_fixture("text_classification_fixtures")
    data = root / "topics.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sentences.topic_rows(60, seed=0)))
    return {
        "model": {"source": f"file://{sentences.minilm_dir()}"},
        "dataset": {
            "source": f"file://{data}",
            "format": "jsonl",
            "fieldMapping": {"text": "sentence", "label": "topic"},
            "split": {"validationRatio": 0.25, "testRatio": 0, "seed": 1},
        },
        "hyperparameters": {
            "maxSteps": 6,
            "warmupSteps": 0,
            "batchSize": 16,
            "learningRate": 1e-4,
            "maxSeqLength": 32,
        },
        "evaluation": {"metrics": ["loss", "accuracy", "f1"]},
    }


def image_classification(root: Path) -> dict[str, Any]:
    images = trainer_fixture("image_fixtures")
    data = images.write_digits(root / "digits", limit=400)
    model = images.make_tiny_image_model(root / "resnet")
    return {
        "model": {"source": f"file://{model}"},
        "dataset": {
            "source": f"file://{data}",
            "format": "image-folder",
            "split": {"validationRatio": 0.2, "testRatio": 0, "seed": 3},
        },
        "hyperparameters": {"maxSteps": 30, "warmupSteps": 0, "batchSize": 32, "learningRate": 3e-3},
        "evaluation": {"metrics": ["loss", "accuracy"]},
    }


def object_detection(root: Path) -> dict[str, Any]:
    shapes = trainer_fixture("detection_shapes")
    annotations = shapes.make_shapes_coco(root / "shapes", 24, seed=0, size=64)
    model = shapes.make_detector_folder(root / "fcos")
    return {
        "model": {"source": f"file://{model}"},
        "dataset": {
            "source": f"file://{annotations}",
            "split": {"validationRatio": 0.25, "testRatio": 0, "seed": 1},
        },
        "hyperparameters": {
            "maxSteps": 6,
            "batchSize": 8,
            "learningRate": 3e-3,
            "lrScheduler": "constant",
            "maxGradNorm": 5.0,
            "seed": 1,
        },
        "evaluation": {"metrics": ["loss", "map", "map50"]},
    }


def recommendation(root: Path) -> dict[str, Any]:
    interactions = trainer_fixture("recommendation_fixtures")
    data = interactions.make_interactions(root / "interactions.csv")
    model = interactions.make_model_definition(root / "mf")
    return {
        "model": {"source": f"file://{model}"},
        "dataset": {
            "source": f"file://{data}",
            "format": "csv",
            "fieldMapping": {"user": "user", "item": "item", "rating": "rating", "timestamp": "timestamp"},
            "augmentation": {"negatives": {"strategy": "uniform", "count": 4}},
        },
        "hyperparameters": {"epochs": 4, "warmupSteps": 0, "batchSize": 128, "learningRate": 0.05},
        "evaluation": {"metrics": ["loss", "recall", "ndcg"], "topK": 10},
    }


TASKS = (
    TaskJob("sequence-classification", "accuracy", True, sequence_classification),
    TaskJob("image-classification", "accuracy", True, image_classification),
    # A detector from random weights needs epochs before its mAP leaves 0 (test_task_object_detection trains
    # 4 epochs for that); in a few steps its loss falls.
    TaskJob("object-detection", "loss", False, object_detection),
    TaskJob("recommendation", "recall", True, recommendation),
)


def task_job(name: str, task: str, parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "task": task,
            "method": "full",
            **parts,
            "checkpointing": {"storage": {"size": "1Gi"}},
            "credentialsSecret": CHECKOUT_SECRET,
            # CPU jobs: no GPU to wait for, so the four run side by side on the local node.
            "distributed": {"nodes": 1, "gpusPerNode": 0, "precision": "fp32"},
            "resources": {
                "nodeSelector": dict(nodeagent.NODE_SELECTOR),
                "tolerations": [dict(nodeagent.TOLERATION)],
            },
        },
    }


#: How long the four jobs may take together (about 5 minutes on a 2-core machine shared with other work).
DEADLINE_S = 420


def all_ended(cluster: Cluster, namespace: str, pods: dict[str, str], timeout: float) -> dict[str, Any]:
    """The ended pods by job name, once every pod has ended or after ``timeout`` (the ones that ended)."""
    deadline = time.monotonic() + timeout
    ended: dict[str, Any] = {}
    while len(ended) < len(pods) and time.monotonic() < deadline:
        for job, pod_name in pods.items():
            if job not in ended:
                pod = kubectl_json(cluster, "get", "pod", pod_name, "-n", namespace)
                if pod["status"].get("phase") in ("Succeeded", "Failed"):
                    ended[job] = pod
        time.sleep(2)
    return ended


def test_a_finetunejob_of_each_task_succeeds_through_the_operator(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    jobs = {f"t-{spec.task}": spec for spec in TASKS}
    manifests = []
    for name, spec in jobs.items():
        (tmp_path / spec.task).mkdir()
        manifests.append(task_job(name, spec.task, spec.make(tmp_path / spec.task)))
    started = time.monotonic()
    path = [REPO / "trainer_image" / "src", REPO / "operator", REPO]
    checkout = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CHECKOUT_SECRET},
        "stringData": {"PYTHONPATH": ":".join(str(p) for p in path)},
    }
    cluster.apply([checkout, *manifests], namespace)

    pods = {name: running_trainer_pod(cluster, namespace, name)["metadata"]["name"] for name in jobs}
    ended = all_ended(cluster, namespace, pods, DEADLINE_S)
    failures: list[str] = []
    figures: list[str] = []
    for name, spec in jobs.items():
        pod = ended.get(name)
        if pod is None or exit_code(pod) != 0:
            how = "still running" if pod is None else f"trainer exit {exit_code(pod)}"
            log = trainer_log(cluster, namespace, pods[name])[-6000:]
            failures.append(f"{spec.task}: {how} after {time.monotonic() - started:.0f}s\n{log}")
            continue

        def finished(name: str = name) -> dict[str, Any] | None:
            job = get_job(cluster, namespace, name)
            return job if job.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        status = wait_for(finished, 60, f"FineTuneJob {namespace}/{name} to end")["status"]
        succeeded = condition({"status": status}, "Succeeded")
        before, after = (
            status.get("metrics", {}).get("before", {}),
            status.get("metrics", {}).get("after", {}),
        )
        figures.append(
            f"{spec.task:24} {spec.metric} {before.get(spec.metric, float('nan')):.3f} -> "
            f"{after.get(spec.metric, float('nan')):.3f}  loss {before.get('loss', float('nan')):.3f} -> "
            f"{after.get('loss', float('nan')):.3f}  steps {status.get('progress', {}).get('step')}  "
            f"ended after {time.monotonic() - started:.0f}s"
        )
        if status["phase"] != "Succeeded" or not succeeded or succeeded["status"] != "True":
            failures.append(f"{spec.task}: phase {status['phase']}, conditions {status.get('conditions')}")
        elif not status.get("artifact", {}).get("uri"):
            log = trainer_log(cluster, namespace, pods[name])[-6000:]
            failures.append(f"{spec.task}: no status.artifact: {status}\n{log}")
        elif spec.metric not in before or spec.metric not in after:
            failures.append(f"{spec.task}: no {spec.metric} before and after in status: {before} -> {after}")
        elif not spec.better(before[spec.metric], after[spec.metric]):
            failures.append(f"{spec.task}: {spec.metric} not better after training: {before} -> {after}")
    print("\n" + "\n".join(figures))
    assert not failures, "\n\n".join(failures)
