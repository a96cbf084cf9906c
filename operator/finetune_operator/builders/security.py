"""The Pod Security Standard `restricted` for every pod the operator builds (trainer and server), and the
one writable place such a pod has besides its volumes.

Every container runs as a non-root user without privilege escalation or capabilities, under the runtime's
seccomp profile, on a read-only root filesystem. What a process writes on its own (HOME, temporary files,
the Hugging Face cache, torch's compile and extension caches) goes to SCRATCH_DIR, an emptyDir, through
the environment of `scratch_env`: the images' defaults point under /tmp, which is read-only there.
"""

from __future__ import annotations

from typing import Any

POD_UID = 10001
"""The user of the trainer image (trainer_image/Dockerfile), which also runs the built-in server. Images
whose default user is root (vLLM's) run as it too: their files are world-readable, and what they write goes
to SCRATCH_DIR."""

SCRATCH_VOLUME = "scratch"
SCRATCH_DIR = "/scratch"
"""Not /tmp: the dev cluster's node agent keeps the pod's volume sources under the node's /tmp, which a
mount there would hide."""


def pod_security_context() -> dict[str, Any]:
    """The pod's part: a non-root user and group, the runtime's seccomp profile. `fsGroup` makes the claims
    the pod writes (checkpoints, output, feedback) writable by that user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_UID,
        "fsGroup": POD_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Each container's part: no privilege escalation, no capabilities, a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def scratch_volume() -> dict[str, Any]:
    return {"name": SCRATCH_VOLUME, "emptyDir": {}}


def scratch_mount() -> dict[str, Any]:
    return {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR}


def scratch_env() -> list[dict[str, Any]]:
    """Where a process writes unless told otherwise, moved onto SCRATCH_DIR. Python's `tempfile` (and so
    the server's ONNX export and torch's inductor cache) follows TMPDIR; caches without a variable of their
    own (triton, vLLM, torch hub) live under HOME. The image sets HF_HOME, TORCH_EXTENSIONS_DIR and
    MPLCONFIGDIR under /tmp: these override them."""
    return [
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/hf"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{SCRATCH_DIR}/torch_extensions"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_DIR}/matplotlib"},
    ]
