"""The operator's own least-privilege identity for tests: the chart's ServiceAccount and RBAC, rendered by
the real `helm template` from helm/finetune-operator, and a kubeconfig holding a token of that
ServiceAccount (a TokenRequest), not the admin's. An operator started with it meets a 403 wherever the
chart lacks a rule it uses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube_helpers import REPO_ROOT, Cluster

CHART = REPO_ROOT / "helm" / "finetune-operator"
KUBE_VERSION = "1.36.3"
"""The dev cluster's Kubernetes version, for `helm template` (it talks to no cluster)."""


def render_chart_rbac(
    cluster: Cluster, release: str, namespace: str, scope: str, watch_namespaces: Sequence[str] = ()
) -> str:
    """The chart's ServiceAccount and RBAC (templates/serviceaccount.yaml, templates/rbac.yaml) as
    `helm template` renders them for `release` in `namespace` with `rbac.scope=scope`."""
    args = [
        str(cluster.bin_dir / "helm"), "template", release, str(CHART), "--namespace", namespace,
        "--kube-version", KUBE_VERSION,
        "--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml",
        "--set", f"rbac.scope={scope}",
    ]  # fmt: skip
    if watch_namespaces:
        args += ["--set", f"watchNamespaces={{{','.join(watch_namespaces)}}}"]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def token_expiry(token: str) -> float:
    """The `exp` claim (Unix time) of a ServiceAccount token (a JWT): when the API server stops taking it."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a ServiceAccount token with an exp claim: {err}") from err


def service_account_kubeconfig(
    cluster: Cluster, namespace: str, account: str, path: Path, duration: str = "1h"
) -> float:
    """Write to `path` a kubeconfig for the admin kubeconfig's cluster whose user is a fresh token of
    ServiceAccount `namespace/account` (TokenRequest for `duration`). Returns the token's expiry (Unix time;
    the API server may grant less than asked). The file is replaced atomically, so a process that logs in
    again reads either the old token or the new one."""
    token = cluster.kubectl(
        "create", "token", account, "-n", namespace, f"--duration={duration}"
    ).stdout.strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account}}
        ],
        "current-context": account,
    }
    partial = path.with_name(path.name + ".new")
    partial.write_text(json.dumps(config))
    partial.chmod(0o600)
    os.replace(partial, path)
    return token_expiry(token)


@dataclass
class OperatorRole:
    """The chart's RBAC with `rbac.scope` cluster, applied for a release of its own, and a kubeconfig with
    a token of its ServiceAccount."""

    cluster: Cluster
    namespace: str
    """The release's namespace: where the ServiceAccount lives."""
    release: str
    kubeconfig_path: Path
    token_duration: str = "3h"
    min_token_left_s: float = 3600.0
    """Less than this left on the token when an operator starts: a new token is requested first (one
    test's operator runs well under an hour)."""
    manifests: str = ""
    expires_at: float = field(default=0.0)

    @property
    def name(self) -> str:
        """The chart's fullname: the ServiceAccount, the ClusterRole, and the names the webhook
        configuration rules allow."""
        return self.release if "finetune-operator" in self.release else f"{self.release}-finetune-operator"

    def apply(self) -> None:
        self.cluster.kubectl("create", "namespace", self.namespace)
        self.manifests = render_chart_rbac(self.cluster, self.release, self.namespace, "cluster")
        self.cluster.kubectl("apply", "-f", "-", input=self.manifests)

    def kubeconfig(self) -> Path:
        """The kubeconfig, with a token that has at least `min_token_left_s` left."""
        if self.expires_at - time.time() < self.min_token_left_s:
            self.expires_at = service_account_kubeconfig(
                self.cluster, self.namespace, self.name, self.kubeconfig_path, self.token_duration
            )
            if self.expires_at - time.time() < self.min_token_left_s:
                raise AssertionError(
                    f"the API server granted a token for ServiceAccount {self.namespace}/{self.name} that "
                    f"expires in {self.expires_at - time.time():.0f}s (asked for {self.token_duration})"
                )
        return self.kubeconfig_path

    def delete(self) -> None:
        if self.manifests:
            self.cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=self.manifests, check=False)
        self.cluster.kubectl("delete", "namespace", self.namespace, "--wait=false", "--ignore-not-found")
