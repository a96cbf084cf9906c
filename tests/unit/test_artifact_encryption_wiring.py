"""Artifact encryption at rest, operator side (pure): the Secret reaches the trainer and the server as a file,
never as a value; the configs name that file; the webhook refuses a missing Secret or key."""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api.modeldeployment import ResolvedModel
from finetune_operator.builders import build_trainer_job
from finetune_operator.builders.encryption import ENCRYPTION_KEY_DIR, ENCRYPTION_KEY_FILE
from finetune_operator.builders.server_config import server_config_json
from finetune_operator.builders.server_deployment import build_revision, build_server_deployment
from finetune_operator.builders.trainer_config import validated_trainer_config
from finetune_operator.validation import review_finetunejob, review_modeldeployment
from finetune_server.config import parse_config as parse_server_config
from tests.unit.test_builders import CONFIG, finetunejob
from tests.unit.test_builders_serving import CONFIG as SERVING_CONFIG
from tests.unit.test_builders_serving import deployment
from tests.unit.test_validation import POLICY, ftj, mdep, view

KEY_REF = {"name": "artifact-key", "key": "aes"}
ENCRYPTED_URI = "pvc://model-store/support-bot/v1/model"


def pod_parts(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (volume,) = [v for v in pod["volumes"] if "secret" in v and v["secret"]["secretName"] == "artifact-key"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    return volume, mount


def test_the_trainer_mounts_the_key_and_its_config_names_the_file() -> None:
    job = finetunejob(output={"uri": "s3://models/bot", "encryptionKeySecretRef": KEY_REF})
    config = validated_trainer_config(job, shutdown_timeout_seconds=570)
    assert config.output.encryption_key_file == ENCRYPTION_KEY_FILE
    assert config.output.copy_to == "s3://models/bot"
    pod = build_trainer_job(job, 1, CONFIG)["spec"]["template"]["spec"]
    volume, mount = pod_parts(pod)
    assert volume["secret"]["items"] == [{"key": "aes", "path": "key"}]
    assert (mount["mountPath"], mount["readOnly"]) == (ENCRYPTION_KEY_DIR, True)


def test_a_job_without_encryption_mounts_no_key() -> None:
    job = finetunejob(output={"uri": "s3://models/bot"})
    assert validated_trainer_config(job, shutdown_timeout_seconds=570).output.encryption_key_file is None
    pod = build_trainer_job(job, 1, CONFIG)["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"] == "encryption-key"]


def test_the_server_of_an_encrypted_uri_gets_the_key_file() -> None:
    md = deployment(model={"uri": ENCRYPTED_URI, "task": "causal-lm", "encryptionKeySecretRef": KEY_REF})
    model = ResolvedModel(
        uri=ENCRYPTED_URI, task="causal-lm", encryption_key_secret_ref=md.spec.model.encryption_key_secret_ref
    )
    served = parse_server_config(json.loads(server_config_json(md, model)))
    assert str(served.encryption.key_file) == ENCRYPTION_KEY_FILE
    pod = build_server_deployment(md, build_revision(md, model, SERVING_CONFIG), "stable", 1)["spec"][
        "template"
    ]["spec"]
    volume, mount = pod_parts(pod)
    assert volume["secret"]["items"] == [{"key": "aes", "path": "key"}]
    assert mount["mountPath"] == ENCRYPTION_KEY_DIR


def test_an_unencrypted_models_server_config_has_no_encryption_key() -> None:
    md = deployment()
    model = ResolvedModel(uri="pvc://llama-sft-checkpoints/output/final/model", task="causal-lm")
    assert "encryption" not in json.loads(server_config_json(md, model))


def test_the_webhook_refuses_a_missing_key_secret_or_key_naming_the_field() -> None:
    job = ftj(output={"uri": "pvc://models/out", "encryptionKeySecretRef": KEY_REF})
    missing = review_finetunejob(job, None, view(claims=frozenset({"datasets", "models"})), POLICY)
    assert [(r.field, r.message) for r in missing] == [
        (
            "spec.output.encryptionKeySecretRef.name",
            "Secret 'artifact-key' not found in namespace 'team-a'; create it first or fix the name",
        )
    ]
    wrong_key = view(secrets={"hf-token": frozenset({"HF_TOKEN"}), "artifact-key": frozenset({"key"})})
    refused = review_finetunejob(job, None, wrong_key, POLICY)
    assert [(r.field, r.message) for r in refused] == [
        ("spec.output.encryptionKeySecretRef.key", "Secret 'artifact-key' has no key 'aes' (keys: key)")
    ]
    present = view(secrets={"hf-token": frozenset({"HF_TOKEN"}), "artifact-key": frozenset({"aes"})})
    assert review_finetunejob(job, None, present, POLICY) == []

    md = mdep(model={"uri": ENCRYPTED_URI, "task": "causal-lm", "encryptionKeySecretRef": KEY_REF})
    claims = frozenset({"model-store"})
    assert [r.field for r in review_modeldeployment(md, None, view(claims=claims), POLICY)] == [
        "spec.model.encryptionKeySecretRef.name"
    ]
