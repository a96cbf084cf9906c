"""The Secret volume that brings an artifact-encryption key into the trainer or the server. Pure.

The trainer encrypts its copy at `spec.output.uri` with it (`finetune_trainer.encryption`), the built-in
server decrypts the model with it before loading (`finetune_server.decryption`). Only the one key of the
Secret is projected, readable by the pod's group only; its value never appears in a ConfigMap (the config
names the file, not the key).
"""

from __future__ import annotations

from typing import Any

from finetune_operator.api.common import SecretKeyRef

ENCRYPTION_KEY_DIR = "/etc/finetune-encryption"
ENCRYPTION_KEY_FILE = f"{ENCRYPTION_KEY_DIR}/key"
ENCRYPTION_VOLUME = "encryption-key"
KEY_FILE_MODE = 0o440
"""Owner and group read: the pod's `fsGroup` is the group the trainer and the server run as."""


def encryption_key_volume(ref: SecretKeyRef) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) projecting `ref`'s key as ENCRYPTION_KEY_FILE."""
    volume = {
        "name": ENCRYPTION_VOLUME,
        "secret": {
            "secretName": ref.name,
            "items": [{"key": ref.key, "path": "key"}],
            "defaultMode": KEY_FILE_MODE,
        },
    }
    mount = {"name": ENCRYPTION_VOLUME, "mountPath": ENCRYPTION_KEY_DIR, "readOnly": True}
    return volume, mount
