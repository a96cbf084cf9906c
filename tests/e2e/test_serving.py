"""A ModelDeployment whose pods really serve: on the dev cluster's local node the built-in server loads a
tiny model, passes its readiness probe, and answers the official `openai` client through the deployment's
Service, behind the API key the operator generated.

The operator runs on this machine, outside the pod network, so it sees the server only through the pod's
readiness probe (`ModelReady` reason `ServerReady`): the measured figures need a route from the operator to
the pods (docs/modeldeployment.md)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import openai
import pytest
from hack.make_tiny_model import make_tiny_assets

from tests.kube_helpers import Cluster, LocalNode, kubectl_json


def test_a_deployment_on_the_local_node_serves_chat_to_the_openai_client(
    cluster: Cluster, local_node: LocalNode, namespace: str, operator: Any, tmp_path: Path
) -> None:
    model_dir = make_tiny_assets(tmp_path / "assets").model_dir
    placement = LocalNode.placement()
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat"},
        "spec": {
            # a model the trainer did not write: no sha256 manifest to check
            "model": {"uri": f"file://{model_dir}", "task": "causal-lm", "verifyManifest": False},
            "runtime": {"maxNewTokens": 8},
            "replicas": 1,
            "resources": {
                "cpu": "1",
                "memory": "2Gi",
                "nodeSelector": placement["nodeSelector"],
                "tolerations": placement["tolerations"],
            },
        },
    }
    cluster.apply(manifest, namespace)
    waited = cluster.kubectl(
        "wait", "--for=condition=Ready", "modeldeployment/chat", "-n", namespace, "--timeout=300s",
        check=False, timeout=330,
    )  # fmt: skip
    if waited.returncode != 0:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        logs = cluster.kubectl("logs", "deployment/chat", "-n", namespace, check=False)
        status = cluster.kubectl("get", "modeldeployment", "chat", "-n", namespace, "-o", "yaml", check=False)
        server_log = "\n".join(line for line in logs.stdout.splitlines() if "/v2/health/" not in line)
        pytest.fail(f"not Ready: {waited.stderr}\n{pods}\n{server_log}{logs.stderr}\n{status.stdout}")
    body = kubectl_json(cluster, "get", "modeldeployment", "chat", "-n", namespace)
    ready = {c["type"]: c for c in body["status"]["conditions"]}
    assert ready["ModelReady"]["status"] == "True"
    pods = kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", "finetune.dev/deployment=chat")[
        "items"
    ]
    assert [p["spec"]["nodeName"] for p in pods] == [local_node.name]

    secret = kubectl_json(cluster, "get", "secret", body["status"]["apiKeySecret"], "-n", namespace)
    key = base64.b64decode(secret["data"]["api-keys"]).decode().strip()
    base_url = local_node.service_address(namespace, "chat", "http") + "/v1"
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "word: kqzt"}], max_tokens=8
    )
    assert answer.choices[0].message.content is not None
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
