"""Names, labels and metadata shared by every child of a ModelDeployment."""

from __future__ import annotations

from typing import Any, Literal

from finetune_operator.api.modeldeployment import ModelDeployment
from finetune_operator.builders.common import COMPONENT_LABEL, owner_reference

DEPLOYMENT_LABEL = "finetune.dev/deployment"
"""On every child and server pod: the owning ModelDeployment's name (the Service selects by it)."""
ROLE_LABEL = "finetune.dev/role"
"""On server Deployments and pods: `stable` or `canary`."""
REVISION_LABEL = "finetune.dev/revision"
"""On server Deployments and pods: the revision (a digest of what the pods run)."""
MANAGED_BY = {
    "app.kubernetes.io/managed-by": "finetune-operator",
    "app.kubernetes.io/name": "finetune-server",
}

Role = Literal["stable", "canary"]
STABLE: Role = "stable"
CANARY: Role = "canary"

SERVER_CONTAINER = "server"
SERVER_PORT = 8000
"""The server's HTTP port in the pod (`finetune_server.config.ServerConfig.port`'s default, vLLM's too)."""
SERVICE_PORT = 80
"""The Service's port: clients call `http://NAME.NAMESPACE.svc/v1`."""
PORT_NAME = "http"


def deployment_name(md: ModelDeployment) -> str:
    return str(md.metadata["name"])


def namespace(md: ModelDeployment) -> str:
    return str(md.metadata["namespace"])


def server_deployment_name(md: ModelDeployment, role: Role) -> str:
    """`NAME` for the stable revision, `NAME-canary` for the one under test."""
    return deployment_name(md) if role == STABLE else f"{deployment_name(md)}-canary"


def service_name(md: ModelDeployment) -> str:
    """The one Service of the deployment, selecting both revisions' pods."""
    return deployment_name(md)


def role_service_name(md: ModelDeployment, role: Role) -> str:
    """The per-revision Services an HTTPRoute splits traffic between."""
    return f"{deployment_name(md)}-{role}"


def server_config_name(md: ModelDeployment, revision: str) -> str:
    """One ConfigMap per revision: a config change is a new revision, never an edit under running pods."""
    return f"{deployment_name(md)}-server-{revision}"


def api_keys_secret_name(md: ModelDeployment) -> str:
    """The Secret of accepted API keys: the user's, or the one the operator generates."""
    ref = md.spec.auth.api_key_secret_ref
    return ref.name if ref else f"{deployment_name(md)}-api-keys"


GENERATED_API_KEYS_KEY = "api-keys"
"""Key of the generated Secret's data."""


def api_keys_secret_key(md: ModelDeployment) -> str:
    ref = md.spec.auth.api_key_secret_ref
    return ref.key if ref else GENERATED_API_KEYS_KEY


def feedback_claim_name(md: ModelDeployment) -> str:
    storage = md.spec.feedback.storage
    return storage.existing_claim or f"{deployment_name(md)}-feedback"


def endpoint(md: ModelDeployment) -> str:
    """Base URL of the OpenAI-compatible API inside the cluster."""
    return f"http://{service_name(md)}.{namespace(md)}.svc/v1"


def serving_labels(md: ModelDeployment, component: str) -> dict[str, str]:
    return {**MANAGED_BY, DEPLOYMENT_LABEL: deployment_name(md), COMPONENT_LABEL: component}


def serving_metadata(md: ModelDeployment, name: str, component: str, **labels: str) -> dict[str, Any]:
    """A child's metadata: fresh (no annotations copied from the parent, never kopf's), owned, labelled."""
    return {
        "name": name,
        "namespace": namespace(md),
        "labels": {**serving_labels(md, component), **labels},
        "ownerReferences": [owner_reference(md)],
    }


def pod_selector(md: ModelDeployment) -> dict[str, str]:
    """Every server pod of the deployment, of either revision."""
    return {DEPLOYMENT_LABEL: deployment_name(md)}


def role_selector(md: ModelDeployment, role: Role) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: deployment_name(md), ROLE_LABEL: role}
