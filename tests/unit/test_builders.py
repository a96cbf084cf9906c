"""Builders are pure: each child manifest is compared with a golden file (FTO_UPDATE_GOLDEN=1 rewrites them)
and its important properties are asserted directly, so a wrong golden file can't hide a bug."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.api.finetunejob import FineTuneJob, parse_finetunejob
from finetune_operator.builders import (
    build_checkpoint_pvc,
    build_deepspeed_config,
    build_headless_service,
    build_role_binding,
    build_service_account,
    build_trainer_configmap,
    build_trainer_job,
    build_trainer_role,
)
from finetune_operator.builders.common import JOB_LABEL, KUEUE_QUEUE_LABEL
from finetune_operator.builders.trainer_config import render_trainer_config, validated_trainer_config
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import TrainerConfig
from finetune_trainer.deepspeed_config import deepspeed_config
from finetune_trainer.exit_codes import NON_RETRYABLE
from finetune_trainer.launch import pod_command

GOLDEN = Path(__file__).parent / "golden"
CONFIG = OperatorConfig(trainer_image="registry.example/trainer:test")


def finetunejob(**spec_overrides: Any) -> FineTuneJob:
    spec: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "hf://meta-llama/Llama-3.2-1B@main"},
        "dataset": {"source": "pvc://datasets/alpaca/train.jsonl", "template": "alpaca"},
        "method": "lora",
        "distributed": {"nodes": 2, "gpusPerNode": 8, "deepspeed": {"zeroStage": 3, "offload": "cpu"}},
        "resources": {"gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "32", "memory": "256Gi"},
        "scheduling": {"priority": 5, "maxRestarts": 2},
    }
    spec.update(spec_overrides)
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "llama-sft",
            "namespace": "team-a",
            "uid": "6a1f9c7e-0000-4000-8000-000000000001",
            "annotations": {"kopf.finetune.dev/last-handled-configuration": "{}", "note": "user"},
        },
        "spec": spec,
    }
    return parse_finetunejob(body)


def check_golden(name: str, manifest: Any) -> None:
    path = GOLDEN / f"{name}.yaml"
    rendered = yaml.safe_dump(manifest, sort_keys=True)
    if os.environ.get("FTO_UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.exists(), f"missing golden file {path}; run with FTO_UPDATE_GOLDEN=1"
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(rendered), f"{name} differs from {path}"


def assert_owned_child(manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    assert meta["namespace"] == "team-a"
    assert meta["labels"][JOB_LABEL] == "llama-sft"
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "llama-sft",
        "uid": "6a1f9c7e-0000-4000-8000-000000000001",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert "annotations" not in meta, "no annotation (kopf's above all) is copied from the parent"


def test_service_account() -> None:
    sa = build_service_account(finetunejob())
    assert_owned_child(sa)
    assert sa["metadata"]["name"] == "llama-sft-trainer"
    check_golden("service_account", sa)


def test_trainer_role_grants_only_own_status() -> None:
    role = build_trainer_role(finetunejob())
    assert_owned_child(role)
    rules = role["rules"]
    for rule in rules:
        assert rule["resourceNames"] == ["llama-sft"], "every rule is restricted to this one job"
        assert rule["apiGroups"] == ["finetune.dev"]
        assert set(rule["verbs"]) <= {"get", "patch"}
    patchable = {r for rule in rules if "patch" in rule["verbs"] for r in rule["resources"]}
    assert patchable == {"finetunejobs/status"}
    check_golden("trainer_role", role)


def test_role_binding_binds_the_trainer_account() -> None:
    binding = build_role_binding(finetunejob())
    assert_owned_child(binding)
    assert binding["roleRef"]["name"] == "llama-sft-trainer"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llama-sft-trainer", "namespace": "team-a"}
    ]
    check_golden("role_binding", binding)


def test_headless_service_publishes_not_ready_pods() -> None:
    svc = build_headless_service(finetunejob(), 29500)
    assert_owned_child(svc)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {JOB_LABEL: "llama-sft"}
    check_golden("headless_service", svc)


def test_checkpoint_pvc_shared_by_a_multi_node_gang() -> None:
    pvc = build_checkpoint_pvc(finetunejob(), CONFIG)
    assert pvc is not None
    assert_owned_child(pvc)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == CONFIG.default_pvc_size
    check_golden("checkpoint_pvc", pvc)
    single = build_checkpoint_pvc(
        finetunejob(distributed={"nodes": 1, "gpusPerNode": 1}, checkpointing={"storage": {"size": "7Gi"}}),
        CONFIG,
    )
    assert single is not None
    assert single["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert single["spec"]["resources"]["requests"]["storage"] == "7Gi"
    assert (
        build_checkpoint_pvc(finetunejob(checkpointing={"storage": {"existingClaim": "mine"}}), CONFIG)
        is None
    )


def test_configmap_holds_a_valid_trainer_config_and_deepspeed_json() -> None:
    job = finetunejob()
    cm = build_trainer_configmap(job, shutdown_timeout_seconds=570)
    assert_owned_child(cm)
    config = TrainerConfig.model_validate(json.loads(cm["data"]["trainer.json"]))
    assert config.model.path == "hf://meta-llama/Llama-3.2-1B"
    assert config.model.revision == "main"
    assert config.data.source == "/mnt/sources/datasets/alpaca/train.jsonl"
    assert config.distributed.zero_stage == 3
    assert config.distributed.offload.value == "all"
    assert config.distributed.shutdown_timeout_seconds == 570
    assert config.checkpointing.dir.startswith("/workspace/")
    assert config.reporting.job_name == "llama-sft"
    assert config.reporting.namespace == "team-a"
    deepspeed = json.loads(cm["data"]["deepspeed.json"])
    # One source: the trainer's own function, for the rendered config and the gang's world size (2 x 8).
    assert deepspeed == deepspeed_config(config, 16, pin_memory=True)
    assert deepspeed == build_deepspeed_config(job, config)
    hp = config.hyperparameters
    assert deepspeed["train_batch_size"] == hp.micro_batch_size * hp.gradient_accumulation_steps * 16
    assert deepspeed["zero_optimization"]["stage"] == 3
    assert deepspeed["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    check_golden("trainer_configmap", cm)


@pytest.mark.parametrize(("nodes", "gpus", "world"), [(1, 0, 1), (1, 1, 1), (1, 4, 4), (3, 8, 24)])
def test_deepspeed_json_is_the_trainers_for_the_gangs_world_size(nodes: int, gpus: int, world: int) -> None:
    job = finetunejob(
        distributed={
            "nodes": nodes,
            "gpusPerNode": gpus,
            "precision": "fp32" if gpus == 0 else "bf16",
            "deepspeed": {"zeroStage": 2, "offload": "cpu"},
        },
        method="lora",
        hyperparameters={"batchSize": 3, "gradientAccumulationSteps": 5},
        resources={"gpuProduct": "NVIDIA-H100-80GB-HBM3"} if gpus else {"cpu": "4"},
    )
    cm = build_trainer_configmap(job, shutdown_timeout_seconds=60)
    config = TrainerConfig.model_validate(json.loads(cm["data"]["trainer.json"]))
    deepspeed = json.loads(cm["data"]["deepspeed.json"])
    assert deepspeed["train_batch_size"] == 3 * 5 * world
    assert deepspeed["train_micro_batch_size_per_gpu"] == 3
    # Pinned host memory only where the pods have GPUs (CUDA); a CPU pod could not pin it.
    assert deepspeed["zero_optimization"]["offload_optimizer"]["pin_memory"] is (gpus > 0)
    assert deepspeed == deepspeed_config(config, world, pin_memory=gpus > 0)


def test_evaluation_max_samples_are_rows_and_generation_samples_pass_through() -> None:
    job = finetunejob(evaluation={"everySteps": 50, "maxSamples": 200, "generationSamples": 4})
    rendered = render_trainer_config(job, shutdown_timeout_seconds=60)
    assert rendered["evaluation"]["maxSamples"] == 200
    assert "maxBatches" not in rendered["evaluation"]
    assert rendered["evaluation"]["generationSamples"] == 4
    config = validated_trainer_config(job, shutdown_timeout_seconds=60)
    assert (config.evaluation.max_samples, config.evaluation.max_batches) == (200, None)
    assert config.evaluation.generation_samples == 4


def _image_job(**dataset: Any) -> FineTuneJob:
    return finetunejob(
        task="image-classification",
        model={"source": "hf://microsoft/resnet-18"},
        method="full",
        dataset={"source": "pvc://datasets/flowers", "format": "image-folder", **dataset},
        distributed={"gpusPerNode": 1},
    )


def test_dataset_images_reach_the_trainer_only_when_given() -> None:
    job = _image_job(images={"mode": "refuse", "minSize": 32, "maxSize": 4096})
    rendered = render_trainer_config(job, shutdown_timeout_seconds=60)
    assert rendered["data"]["images"] == {"mode": "refuse", "minSize": 32, "maxSize": 4096}
    images = validated_trainer_config(job, shutdown_timeout_seconds=60).data.images
    assert (images.mode, images.min_size, images.max_size) == ("refuse", 32, 4096)
    # Omitted: nothing is written and the trainer applies its own defaults (convert, 1 pixel, no limit).
    plain = _image_job()
    assert "images" not in render_trainer_config(plain, shutdown_timeout_seconds=60)["data"]
    images = validated_trainer_config(plain, shutdown_timeout_seconds=60).data.images
    assert (images.mode, images.min_size, images.max_size) == ("convert", 1, None)


@pytest.mark.parametrize("existing", [None, "shared-models"])
def test_output_uri_addresses_the_output_dir_on_the_checkpoint_claim(existing: str | None) -> None:
    storage = {"existingClaim": existing} if existing else {"size": "10Gi"}
    job = finetunejob(output={"path": "runs/v1"}, checkpointing={"storage": storage})
    config = validated_trainer_config(job, shutdown_timeout_seconds=60)
    claim = existing or "llama-sft-checkpoints"
    assert config.output.uri == f"pvc://{claim}/output/runs/v1"
    # The same folder: the claim is mounted at the workspace, output.dir is below it.
    pvc_path = config.output.uri.removeprefix(f"pvc://{claim}/")
    pod = build_trainer_job(job, 1, CONFIG)["spec"]["template"]["spec"]
    [mount] = [
        m for m in pod["containers"][0]["volumeMounts"] if config.output.dir.startswith(m["mountPath"] + "/")
    ]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert f"{mount['mountPath']}/{pvc_path}" == config.output.dir


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_trainer_job_is_an_indexed_gang_wired_for_torchrun() -> None:
    manifest = build_trainer_job(finetunejob(), 3, CONFIG)
    assert_owned_child(manifest)
    assert manifest["metadata"]["name"] == "llama-sft-a3"
    assert manifest["metadata"]["labels"]["finetune.dev/attempt"] == "3"
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert "suspend" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert set(rules[0]["onExitCodes"]["values"]) == {int(c) for c in NON_RETRYABLE}
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    template = spec["template"]
    assert template["metadata"]["labels"][JOB_LABEL] == "llama-sft"
    assert template["metadata"]["labels"]["finetune.dev/attempt"] == "3"
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "llama-sft"
    assert pod["serviceAccountName"] == "llama-sft-trainer"
    assert pod["terminationGracePeriodSeconds"] == CONFIG.termination_grace_seconds
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    (container,) = pod["containers"]
    assert container["name"] == "trainer"
    assert container["image"] == "registry.example/trainer:test"
    assert container["command"] + container["args"] == pod_command("/etc/finetune/trainer.json")
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"] == container["resources"]["requests"]
    env = env_of(container)
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["PET_MASTER_ADDR"] == "llama-sft-a3-0.llama-sft"
    assert env["PET_MASTER_PORT"] == str(CONFIG.master_port)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"] == "llama-sft-checkpoints"
    assert volumes[mounts["/etc/finetune"]]["configMap"]["name"] == "llama-sft-config"
    assert volumes[mounts["/mnt/sources/datasets"]]["persistentVolumeClaim"] == {
        "claimName": "datasets",
        "readOnly": True,
    }
    check_golden("trainer_job", manifest)


def test_trainer_job_with_a_kueue_queue_is_created_suspended() -> None:
    manifest = build_trainer_job(finetunejob(scheduling={"queueName": "gpu-queue"}), 1, CONFIG)
    assert manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert manifest["spec"]["suspend"] is True


def test_cpu_only_single_pod_job_has_no_gpu_bits() -> None:
    manifest = build_trainer_job(
        finetunejob(distributed={"nodes": 1, "gpusPerNode": 0, "precision": "fp32"}, resources={}), 1, CONFIG
    )
    pod = manifest["spec"]["template"]["spec"]
    assert "affinity" not in pod
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert env_of(pod["containers"][0])["PET_NPROC_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]


@pytest.mark.parametrize("attempt", [1, 2, 10])
def test_pod_hostnames_fit_a_dns_label(attempt: int) -> None:
    name = build_trainer_job(finetunejob(), attempt, CONFIG)["metadata"]["name"]
    assert len(f"{name}-63") <= 63


def test_an_admitted_gang_is_pinned_to_the_nodes_its_gpus_were_counted_on() -> None:
    pinned = build_trainer_job(finetunejob(), 1, CONFIG, ["gpu-node-1", "gpu-node-0"])
    affinity = pinned["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-node-0", "gpu-node-1"]}
    ]
    assert "podAntiAffinity" in affinity  # still one pod per node
    unpinned = build_trainer_job(finetunejob(), 2, CONFIG)
    assert "nodeAffinity" not in unpinned["spec"]["template"]["spec"]["affinity"]
