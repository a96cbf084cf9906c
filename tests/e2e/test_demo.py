"""`make demo` works: hack/demo.py against the test session's cluster, in its own namespace: the example job
trains to success, its ModelDeployment gets Ready on the local node and answers the official `openai` client,
and the summary carries the training and compression figures and calls that work."""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.kube_helpers import Cluster, kubectl_json

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("local_node")]


def test_demo_trains_the_example_job_and_serves_it(cluster: Cluster, crds: list[str], tmp_path: Path) -> None:
    namespace = f"t-demo-{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "FTO_USE_EXISTING_CLUSTER": "1",
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # this cluster's kubectl
        "FTO_DEMO_NAMESPACE": namespace,
        "FTO_DEMO_DIR": str(tmp_path),
    }
    try:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "hack" / "demo.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        job = kubectl_json(cluster, "get", "finetunejob", "demo", "-n", namespace)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        assert f"FineTuneJob {namespace}/demo: Succeeded" in out
        metrics = job["status"]["metrics"]
        assert metrics["after"]["loss"] < metrics["before"]["loss"]
        assert "loss curve: " in out
        assert "the node agent runs its trainer container here" in out

        deployment = kubectl_json(cluster, "get", "modeldeployment", "demo", "-n", namespace)
        conditions = {c["type"]: c["status"] for c in deployment["status"]["conditions"]}
        assert conditions["Ready"] == "True", deployment["status"]
        assert f"ModelDeployment {namespace}/demo: Ready" in out
        assert "the node agent runs its server container here" in out
        answer = re.search(r"answer: .+ \((\d+) tokens", out)  # through the openai client
        assert answer, out
        assert int(answer.group(1)) > 0, out
        summary = out[out.index("==> summary") :]
        assert re.search(r"training +.*loss \d+\.\d+ -> \d+\.\d+", summary), summary
        compression = re.search(r"compression +int8-dynamic: ([\d.]+) MB -> ([\d.]+) MB", summary)
        assert compression, summary
        assert float(compression.group(2)) < float(compression.group(1)), summary
        assert re.search(r"perplexity [\d.]+ -> [\d.]+: quality drop -?[\d.]+% \(max 5\.00%\)", summary)
        assert re.search(r"\(from (ModelDeployment status|the server's /v2/health/ready)", summary), summary

        # The server stays up after the demo; what the summary says to do reaches it.
        url = re.search(r"on this machine: (http://127\.0\.0\.1:\d+/v1)", summary)
        assert url, summary
        secret = kubectl_json(cluster, "get", "secret", deployment["status"]["apiKeySecret"], "-n", namespace)
        key = base64.b64decode(secret["data"]["api-keys"]).decode().split()[0]
        client = openai.OpenAI(base_url=url.group(1), api_key=key, max_retries=2, timeout=60)
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "word: kqzt\nfirst:"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        assert f"curl -s {url.group(1)}/chat/completions" in summary
    finally:
        # The demo leaves its job for you to look at; its operator is gone, so drop the finalizer first.
        for name in cluster.kubectl("get", "ftj", "-n", namespace, "-o", "name", check=False).stdout.split():
            cluster.kubectl(
                "patch",
                name,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
