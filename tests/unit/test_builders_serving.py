"""The ModelDeployment's children are pure builds: each is compared with a golden file
(FTO_UPDATE_GOLDEN=1 rewrites them) and its important properties are asserted directly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator.api.modeldeployment import ModelDeployment, ResolvedModel, parse_modeldeployment
from finetune_operator.builders.autoscaling import build_hpa, build_pdb
from finetune_operator.builders.server_config import (
    ServingBuildError,
    build_server_configmap,
    render_server_config,
    server_config_json,
)
from finetune_operator.builders.server_deployment import build_revision, build_server_deployment
from finetune_operator.builders.serving import ClusterFeatures, ServingPlan, build_serving_children
from finetune_operator.builders.serving_common import DEPLOYMENT_LABEL, REVISION_LABEL, ROLE_LABEL
from finetune_operator.builders.serving_extras import (
    build_api_keys_secret,
    build_feedback_pvc,
    build_pod_monitor,
)
from finetune_operator.builders.serving_network import (
    build_http_route,
    build_network_policy,
    build_role_service,
    build_service,
)
from finetune_operator.config import OperatorConfig
from finetune_server.config import parse_config
from tests.unit.test_builders import check_golden

CONFIG = OperatorConfig(server_image="registry.example/server:test", vllm_image="registry.example/vllm:test")
MODEL = ResolvedModel(
    uri="pvc://llama-sft-checkpoints/output/final/model", task="causal-lm", sha256="ab" * 32
)
UID = "6a1f9c7e-0000-4000-8000-000000000002"


def deployment(**spec: Any) -> ModelDeployment:
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "bot",
            "namespace": "team-a",
            "uid": UID,
            "generation": 3,
            "annotations": {"kopf.finetune.dev/last-handled-configuration": "{}"},
        },
        "spec": {
            "model": {"fromFineTuneJob": "llama-sft"},
            "quantization": {"method": "int8-dynamic", "maxQualityDrop": 0.03},
            "replicas": 2,
            "resources": {"cpu": "2", "memory": "4Gi"},
            **spec,
        },
    }
    return parse_modeldeployment(body)


CANARY = {
    "strategy": "Canary",
    "canary": {"steps": [{"weight": 10}, {"weight": 50}], "gatewayRef": {"name": "gw", "namespace": "infra"}},
}


def assert_owned(manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    assert meta["namespace"] == "team-a"
    assert meta["labels"][DEPLOYMENT_LABEL] == "bot"
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelDeployment",
        "bot",
        UID,
        True,
    )
    assert "annotations" not in meta, "nothing is copied from the parent's annotations (kopf's above all)"


# --- server config ----------------------------------------------------------------------------------------


def test_server_config_is_what_the_server_accepts() -> None:
    md = deployment(feedback={"enabled": True}, runtime={"maxNewTokens": 8, "faultErrorRate": 0.25})
    text = server_config_json(md, MODEL)
    served = parse_config(json.loads(text))
    assert served.model_dir.as_posix() == "/mnt/model/output/final/model"
    assert served.model_name == "bot"
    assert served.device == "cpu"
    assert served.quantization.method == "int8-dynamic"
    assert served.quantization.max_quality_drop == 0.03
    assert served.limits.max_new_tokens == 8
    assert served.limits.default_max_new_tokens == 8, "the default never exceeds the limit"
    assert served.auth.mode == "api-keys"
    assert served.feedback.enabled
    assert served.faults.error_rate == 0.25
    configmap = build_server_configmap(md, "bot-server-x", text)
    assert_owned(configmap)
    assert configmap["immutable"] is True
    check_golden("mdep_server_configmap", configmap)


def test_auth_off_renders_mode_none() -> None:
    assert render_server_config(deployment(auth={"enabled": False}), MODEL)["auth"] == {"mode": "none"}


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (ResolvedModel(uri="s3://bucket/model", task="causal-lm"), "spec.model.uri"),
        (ResolvedModel(uri="hf://org/model", task="causal-lm"), "spec.model.uri"),
        # A catalog task the server would not serve yet (every task is served today).
        (ResolvedModel.model_construct(uri="pvc://c/m", task="speech-recognition"), "spec.model.task"),
        (ResolvedModel(task="causal-lm"), "spec.model"),
    ],
)
def test_what_the_builtin_server_cannot_serve_is_refused_naming_the_field(
    model: ResolvedModel, field: str
) -> None:
    with pytest.raises(ServingBuildError) as refused:
        build_revision(deployment(), model, CONFIG)
    assert refused.value.field == field


# --- revisions and Deployments ----------------------------------------------------------------------------


def test_stable_deployment() -> None:
    md = deployment()
    revision = build_revision(md, MODEL, CONFIG)
    manifest = build_server_deployment(md, revision, "stable", 2)
    assert_owned(manifest)
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "bot"
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == {DEPLOYMENT_LABEL: "bot", ROLE_LABEL: "stable"}
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]
    assert pod["metadata"]["labels"][REVISION_LABEL] == revision.name
    assert pod["metadata"]["labels"][ROLE_LABEL] == "stable"
    pod_spec = pod["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    (container,) = pod_spec["containers"]
    assert container["command"] + container["args"] == [
        "python", "-m", "finetune_server", "--config", "/etc/finetune-server/config/server.json",
    ]  # fmt: skip
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == f"bot-server-{revision.name}"
    assert volumes["model"]["persistentVolumeClaim"] == {
        "claimName": "llama-sft-checkpoints",
        "readOnly": True,
    }
    assert volumes["api-keys"]["secret"]["secretName"] == "bot-api-keys"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    check_golden("mdep_stable_deployment", manifest)


def test_autoscaled_stable_deployment_leaves_replicas_to_the_hpa() -> None:
    md = deployment(replicas=None, autoscaling={"maxReplicas": 4, "targetRequestsWaiting": 2})
    manifest = build_server_deployment(md, build_revision(md, MODEL, CONFIG), "stable", None)
    assert "replicas" not in manifest["spec"]


def test_revision_follows_what_the_pods_run_and_nothing_else() -> None:
    base = build_revision(deployment(), MODEL, CONFIG).name
    assert build_revision(deployment(replicas=5), MODEL, CONFIG).name == base, "scaling is not a new revision"
    assert build_revision(deployment(runtime={"maxNewTokens": 64}), MODEL, CONFIG).name != base
    assert build_revision(deployment(runtime={"image": "other:1"}), MODEL, CONFIG).name != base
    other_model = MODEL.model_copy(update={"uri": "pvc://llama-sft-checkpoints/output/v2/model"})
    assert build_revision(deployment(), other_model, CONFIG).name != base


def test_canary_deployment_runs_the_new_revision_beside_the_stable() -> None:
    md = deployment(rollout=CANARY, runtime={"faultErrorRate": 0.5})
    revision = build_revision(md, MODEL, CONFIG)
    manifest = build_server_deployment(md, revision, "canary", 1)
    assert manifest["metadata"]["name"] == "bot-canary"
    assert manifest["spec"]["selector"]["matchLabels"][ROLE_LABEL] == "canary"
    check_golden("mdep_canary_deployment", manifest)


def test_vllm_deployment_maps_quantization_to_its_flags() -> None:
    md = deployment(
        model={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main", "task": "causal-lm"},
        runtime={"type": "vllm", "dtype": "bf16"},
        quantization={"method": "fp8-dynamic"},
        resources={"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    )
    model = ResolvedModel(uri="hf://Qwen/Qwen2.5-0.5B-Instruct@main", task="causal-lm")
    revision = build_revision(md, model, CONFIG)
    assert revision.config_json is None, "vLLM takes flags, not our server's config"
    manifest = build_server_deployment(md, revision, "stable", 2)
    pod_spec = manifest["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert args[args.index("--revision") + 1] == "main"
    assert args[args.index("--quantization") + 1] == "fp8"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert container["image"] == "registry.example/vllm:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "bot-api-keys", "key": "api-keys"}
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    check_golden("mdep_vllm_deployment", manifest)


def test_vllm_nf4_uses_bitsandbytes() -> None:
    md = deployment(runtime={"type": "vllm"}, quantization={"method": "bnb-nf4"}, resources={"gpus": 1})
    container = build_revision(md, MODEL, CONFIG).template["spec"]["containers"][0]
    assert container["args"][container["args"].index("--quantization") + 1] == "bitsandbytes"
    assert container["args"][container["args"].index("--model") + 1] == "/mnt/model/output/final/model"


# --- network, scaling, extras -----------------------------------------------------------------------------


def test_service_selects_both_revisions() -> None:
    service = build_service(deployment())
    assert_owned(service)
    assert service["spec"]["selector"] == {DEPLOYMENT_LABEL: "bot"}
    assert service["spec"]["ports"][0]["port"] == 80
    check_golden("mdep_service", service)


def test_http_route_splits_by_weight_between_role_services() -> None:
    md = deployment(rollout=CANARY)
    gateway = md.spec.rollout.canary.gateway_ref  # type: ignore[union-attr]
    assert gateway is not None
    route = build_http_route(md, gateway, 10)
    assert_owned(route)
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [("bot-stable", 90), ("bot-canary", 10)]
    assert route["spec"]["parentRefs"][0]["namespace"] == "infra"
    assert build_role_service(md, "canary")["spec"]["selector"] == {
        DEPLOYMENT_LABEL: "bot",
        ROLE_LABEL: "canary",
    }
    check_golden("mdep_http_route", route)


def test_network_policy_opens_only_the_api_port() -> None:
    policy = build_network_policy(deployment())
    assert_owned(policy)
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    check_golden("mdep_network_policy", policy)


def test_hpa_targets_the_stable_deployment() -> None:
    assert build_hpa(deployment()) is None
    md = deployment(
        replicas=None,
        autoscaling={
            "minReplicas": 2,
            "maxReplicas": 6,
            "targetCpuUtilization": 70,
            "targetRequestsWaiting": 4,
        },
    )
    hpa = build_hpa(md)
    assert hpa is not None
    assert_owned(hpa)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "bot"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    check_golden("mdep_hpa", hpa)


def test_pdb_allows_one_disruption_at_a_time() -> None:
    pdb = build_pdb(deployment())
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {DEPLOYMENT_LABEL: "bot"}}}
    check_golden("mdep_pdb", pdb)


def test_pod_monitor() -> None:
    monitor = build_pod_monitor(deployment())
    assert monitor is not None
    assert_owned(monitor)
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert build_pod_monitor(deployment(monitoring={"podMonitor": False})) is None
    check_golden("mdep_pod_monitor", monitor)


def test_api_keys_secret_only_when_the_operator_must_make_one() -> None:
    secret = build_api_keys_secret(deployment(), "k-123")
    assert secret is not None
    assert secret["metadata"]["name"] == "bot-api-keys"
    assert secret["stringData"] == {"api-keys": "k-123\n"}
    assert (
        build_api_keys_secret(deployment(auth={"apiKeySecretRef": {"name": "mine", "key": "k"}}), "x") is None
    )
    assert build_api_keys_secret(deployment(auth={"enabled": False}), "x") is None


def test_feedback_volume() -> None:
    assert build_feedback_pvc(deployment(), CONFIG) is None
    pvc = build_feedback_pvc(deployment(feedback={"enabled": True}), CONFIG)
    assert pvc is not None
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "two replicas append to it"
    check_golden("mdep_feedback_pvc", pvc)


def test_children_render_optional_kinds_only_where_their_api_exists() -> None:
    md = deployment(rollout=CANARY)
    stable = build_revision(deployment(), MODEL, CONFIG)
    canary = build_revision(md.model_copy(deep=True), MODEL.model_copy(update={"uri": "pvc://c/new"}), CONFIG)
    plan = ServingPlan(stable=stable, stable_replicas=2, canary=canary, canary_replicas=1, canary_weight=10)
    bare = build_serving_children(md, plan, ClusterFeatures(), CONFIG)
    kinds = [(c["kind"], c["metadata"]["name"]) for c in bare]
    assert ("Deployment", "bot") in kinds
    assert ("Deployment", "bot-canary") in kinds
    assert sum(1 for kind, _ in kinds if kind == "ConfigMap") == 2, "one config per revision"
    assert not any(kind in ("HTTPRoute", "PodMonitor") for kind, _ in kinds)
    full = build_serving_children(
        md, plan, ClusterFeatures(gateway_api=True, prometheus_operator=True), CONFIG
    )
    full_kinds = {(c["kind"], c["metadata"]["name"]) for c in full}
    assert {
        ("HTTPRoute", "bot"),
        ("PodMonitor", "bot"),
        ("Service", "bot-stable"),
        ("Service", "bot-canary"),
    } <= full_kinds
    for child in full:
        assert_owned(child)


def test_pod_reads_go_through_the_api_server_outside_a_pod() -> None:
    assert OperatorConfig().pod_reads_through_apiserver({})
    assert not OperatorConfig().pod_reads_through_apiserver({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not OperatorConfig(pod_reads="direct").pod_reads_through_apiserver({})
