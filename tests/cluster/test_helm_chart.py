"""The Helm chart installs on a real API server, passes Pod Security `restricted`, grants least privilege."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.builders.webhooks import build_webhook_configurations
from finetune_operator.config import OperatorConfig
from tests.kube_helpers import wait_for

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "helm" / "finetune-operator"


def _helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_helm_lint_and_template_render_for_the_dev_cluster_version(cluster: Any) -> None:
    lint = _helm(cluster, "lint", str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = _helm(cluster, "template", "t", str(CHART), "--namespace", "x", "--kube-version", "1.36.3")
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: ClusterRole" in rendered.stdout
    assert "strategy: {type: Recreate}" in rendered.stdout


def test_chart_audit_persistence_env_is_what_the_operator_reads(cluster: Any) -> None:
    """Helm renders large numbers as floats (6.7108864e+07) unless told otherwise; the operator would refuse
    to start. Every literal env value of the rendered Deployment goes through the operator's own config."""
    rendered = _helm(
        cluster, "template", "t", str(CHART), "--namespace", "x", "--kube-version", "1.36.3",
        "--set", "audit.persistence.enabled=true", "--show-only", "templates/deployment.yaml",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    deployment = yaml.safe_load(rendered.stdout)
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = OperatorConfig.from_env(env)
    persistence = yaml.safe_load((CHART / "values.yaml").read_text())["audit"]["persistence"]
    assert config.audit_max_file_bytes == persistence["maxFileBytes"]
    assert config.audit_keep_files == persistence["keepFiles"]
    assert str(config.audit_dir) == "/audit"


def test_chart_installs_under_restricted_pod_security_and_grants_least_privilege(
    cluster: Any, namespace: str
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    release = f"fto-{uuid.uuid4().hex[:6]}"
    try:
        out = _helm(
            cluster, "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "90s"
        )
        assert out.returncode == 0, out.stdout + out.stderr

        def available() -> bool:
            dep = json.loads(cluster.kubectl("get", "deployment", "-n", namespace, "-o", "json").stdout)[
                "items"
            ]
            return bool(dep) and dep[0].get("status", {}).get("availableReplicas") == 1

        wait_for(available, timeout=60, message="operator Deployment from the chart never became available")

        sa = f"system:serviceaccount:{namespace}:{release}-finetune-operator"

        def can(*what: str) -> str:
            res = cluster.kubectl("auth", "can-i", *what, f"--as={sa}", check=False)
            return res.stdout.strip()

        assert can("create", "jobs.batch", "-n", "default") == "yes"
        assert can("patch", "finetunejobs.finetune.dev", "--subresource=status", "-n", "default") == "yes"
        assert can("list", "secrets", "-n", "default") == "no"
        assert can("create", "pods", "-n", "default") == "no"
        assert can("delete", "nodes") == "no"
    finally:
        _helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")


def test_chart_webhook_configurations_are_the_operators(cluster: Any) -> None:
    """The chart owns the configurations (so uninstall removes them) and the operator applies its own with
    the caBundle over them: both must say the same."""
    rendered = _helm(
        cluster, "template", "t", str(CHART), "--namespace", "x", "--kube-version", "1.36.3",
        "--set", "watchNamespaces={team-b,team-a}", "--show-only", "templates/webhooks.yaml",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    by_kind = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered.stdout) if doc}
    built = build_webhook_configurations(
        "t-finetune-operator",
        ca_pem=b"",
        service="x/t-finetune-operator-webhook",
        namespaces=["team-b", "team-a"],
        timeout_seconds=10,
    )
    for manifest in built:
        for hook in manifest["webhooks"]:
            del hook["clientConfig"]["caBundle"]
        assert by_kind[manifest["kind"]]["webhooks"] == manifest["webhooks"], manifest["kind"]


def test_namespaced_rbac_mode_grants_roles_in_the_watched_namespaces_only(
    cluster: Any, namespace: str
) -> None:
    """rbac.scope namespaced, installed with the real helm: a Role and RoleBinding in the watched
    namespace, a ClusterRole with only what has no namespace, the operator told to watch that namespace."""
    release = f"fto-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-finetune-operator"
    refused = _helm(
        cluster, "template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.36.3",
        "--set", "rbac.scope=namespaced",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "rbac.scope namespaced needs watchNamespaces" in refused.stderr
    try:
        out = _helm(
            cluster, "install", release, str(CHART), "--namespace", namespace,
            "--set", "rbac.scope=namespaced", "--set", f"watchNamespaces={{{namespace}}}",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        role = json.loads(cluster.kubectl("get", "role", fullname, "-n", namespace, "-o", "json").stdout)
        binding = json.loads(
            cluster.kubectl("get", "rolebinding", fullname, "-n", namespace, "-o", "json").stdout
        )
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": fullname,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": namespace}]
        cluster_role = json.loads(cluster.kubectl("get", "clusterrole", fullname, "-o", "json").stdout)
        cluster_scoped = {
            "customresourcedefinitions", "namespaces", "nodes", "pods", "storageclasses",
            "validatingwebhookconfigurations", "mutatingwebhookconfigurations",
        }  # fmt: skip
        assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == cluster_scoped
        assert "jobs" in {r for rule in role["rules"] for r in rule["resources"]}
        deployment = json.loads(
            cluster.kubectl("get", "deployment", fullname, "-n", namespace, "-o", "json").stdout
        )
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={namespace}" in args
        assert "--all-namespaces" not in args

        sa = f"system:serviceaccount:{namespace}:{fullname}"

        def can(*what: str) -> str:
            return cluster.kubectl("auth", "can-i", *what, f"--as={sa}", check=False).stdout.strip()

        assert can("create", "jobs.batch", "-n", namespace) == "yes"
        assert can("patch", "finetunejobs.finetune.dev", "--subresource=status", "-n", namespace) == "yes"
        assert can("create", "jobs.batch", "-n", "default") == "no"
        assert can("get", "secrets", "-n", "default") == "no"
        assert can("list", "nodes") == "yes"
        assert can("list", "storageclasses.storage.k8s.io") == "yes"
        assert can("delete", "nodes") == "no"
        assert can("list", "pods", "--all-namespaces") == "yes"  # GPU admission counts every pod's GPUs
        assert can("delete", "pods", "-n", namespace) == "yes"
        assert can("delete", "pods", "-n", "default") == "no"
    finally:
        _helm(cluster, "uninstall", release, "--namespace", namespace, "--wait")
