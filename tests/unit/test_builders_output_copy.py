"""`spec.output.uri`: where the trainer is told to copy (`output.copyTo`) and the claim the pods mount."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.builders import build_trainer_job
from finetune_operator.builders.trainer_config import (
    OUTPUT_MOUNT,
    render_trainer_config,
    validated_trainer_config,
)
from finetune_trainer.config import ConfigError
from tests.unit.test_builders import CONFIG, finetunejob


def pod_spec(**spec: Any) -> dict[str, Any]:
    spec_: dict[str, Any] = build_trainer_job(finetunejob(**spec), 1, CONFIG)["spec"]["template"]["spec"]
    return spec_


def claims_mounted_at(pod: dict[str, Any], path: str) -> list[tuple[str, bool]]:
    """(claim, read-only volume) for every mount at `path`."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = []
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["mountPath"] == path:
            assert not mount.get("readOnly", False), mount
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            out.append((claim["claimName"], bool(claim.get("readOnly", False))))
    return out


@pytest.mark.parametrize("uri", [None, "s3://ml-models/support-bot/v1", "file:///models/support-bot"])
def test_no_pvc_destination_mounts_nothing_and_remote_uris_pass_through(uri: str | None) -> None:
    output = {"uri": uri} if uri else {}
    pod = pod_spec(output=output)
    assert claims_mounted_at(pod, OUTPUT_MOUNT) == []
    assert [v["name"] for v in pod["volumes"]] == ["config", "workspace", "dshm", "scratch", "source-0"]
    config = validated_trainer_config(finetunejob(output=output), shutdown_timeout_seconds=60)
    assert config.output.copy_to == uri
    assert config.output.copy_to_uri == uri
    # output.uri keeps its meaning: the export's address on the checkpoint claim.
    assert config.output.uri == "pvc://llama-sft-checkpoints/output/model"
    if uri is None:
        rendered = render_trainer_config(finetunejob(), shutdown_timeout_seconds=60)
        assert "copyTo" not in rendered["output"]
        assert "copyToUri" not in rendered["output"]


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("pvc://model-store/support-bot/v1", f"{OUTPUT_MOUNT}/support-bot/v1"),
        ("pvc://model-store", OUTPUT_MOUNT),
    ],
)
def test_a_pvc_destination_is_mounted_read_write_and_the_trainer_copies_to_the_mount(
    uri: str, target: str
) -> None:
    pod = pod_spec(output={"uri": uri})
    assert claims_mounted_at(pod, OUTPUT_MOUNT) == [("model-store", False)]
    config = validated_trainer_config(finetunejob(output={"uri": uri}), shutdown_timeout_seconds=60)
    assert config.output.copy_to == target
    assert config.output.copy_to_uri == uri  # what status.artifact reports


def test_the_checkpoint_claim_as_destination_needs_no_second_mount() -> None:
    output = {"uri": "pvc://llama-sft-checkpoints/exports/v1"}
    pod = pod_spec(output=output)
    assert claims_mounted_at(pod, OUTPUT_MOUNT) == []
    assert [
        v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    ] == [
        "llama-sft-checkpoints",
        "datasets",
    ]
    config = validated_trainer_config(finetunejob(output=output), shutdown_timeout_seconds=60)
    workspace = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "workspace")
    assert config.output.copy_to == f"{workspace['mountPath']}/exports/v1"


def test_a_destination_inside_the_jobs_own_output_folder_is_refused() -> None:
    job = finetunejob(output={"uri": "pvc://llama-sft-checkpoints/output/model/copy"})
    with pytest.raises(ConfigError, match=r"output.copyTo .* is inside output.dir .*spec.output.uri"):
        validated_trainer_config(job, shutdown_timeout_seconds=60)


def test_a_source_claim_that_is_also_the_destination_is_one_volume_mounted_twice() -> None:
    # The dataset comes from pvc://datasets/...; the model goes to the same claim.
    pod = pod_spec(output={"uri": "pvc://datasets/models/v1"})
    assert claims_mounted_at(pod, OUTPUT_MOUNT) == [("datasets", False)]
    source = next(
        m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/sources/datasets"
    )
    assert source["readOnly"] is True
    assert (
        sum(1 for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "datasets")
        == 1
    )


def test_the_credentials_secret_becomes_the_trainers_environment() -> None:
    [container] = pod_spec(credentialsSecret="s3-credentials", output={"uri": "s3://models/v1"})["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    [plain] = pod_spec()["containers"]
    assert "envFrom" not in plain
