"""The server config: the names the operator renders, refusals that name the field, no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_server.config import (
    CPU_METHODS,
    CUDA_METHODS,
    METHOD_DEVICES,
    QUANTIZATION_METHODS,
    ConfigError,
    ServerConfig,
    load_config,
    parse_config,
    resolve_device,
)
from trainer_fixtures import trainer_env

BASE: dict[str, Any] = {"modelDir": "/models/m", "modelName": "m"}


def _with(**sections: Any) -> dict[str, Any]:
    return {**BASE, **sections}


def test_importing_the_config_does_not_import_torch() -> None:
    code = (
        "import sys, finetune_server.config; "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=trainer_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_method_has_exactly_its_devices() -> None:
    assert set(METHOD_DEVICES) == set(QUANTIZATION_METHODS)
    assert not CPU_METHODS & CUDA_METHODS
    for method, devices in METHOD_DEVICES.items():
        expected = (
            {"cpu"} if method in CPU_METHODS else {"cuda"} if method in CUDA_METHODS else {"cpu", "cuda"}
        )
        assert devices == expected, method


def test_defaults_are_a_safe_server() -> None:
    config = parse_config(BASE)
    assert config.auth.mode == "api-keys"
    assert config.verify_manifest
    assert config.quality_gate.enabled
    assert config.quantization.method == "none"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_with(quantizaton={}), "did you mean 'quantization'"),
        (_with(limits={"maxNewToken": 3}), "did you mean 'maxNewTokens'"),
        (_with(dtype="bfloat16"), "dtype"),
        (_with(quantization={"method": "int8"}), "quantization.method"),
        (_with(device="cpu", quantization={"method": "bnb-nf4"}), "quantization.method: bnb-nf4 needs cuda"),
        (_with(device="cuda", quantization={"method": "int8-dynamic"}), "quantization.method"),
        (_with(dtype="bf16", quantization={"method": "onnx-int8"}), "dtype"),
        (_with(pruning={"method": "magnitude"}), "sparsity"),
        (_with(pruning={"method": "2:4", "sparsity": 0.7}), "sparsity"),
        (_with(pruning={"method": "none", "sparsity": 0.3}), "sparsity"),
        (_with(limits={"maxNewTokens": 8, "defaultMaxNewTokens": 16}), "defaultMaxNewTokens"),
        (_with(batching={"maxBatchSize": 0}), "maxBatchSize"),
        (_with(faults={"errorRate": 2}), "errorRate"),
        ({"modelName": "m"}, "modelDir"),
    ],
)
def test_invalid_configs_are_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert field in text or field.split(".")[-1] in text, text


def test_a_method_on_the_wrong_device_is_refused_when_the_device_is_resolved() -> None:
    config = parse_config(_with(quantization={"method": "fp8-dynamic"}))  # device auto: decided at load
    assert resolve_device(config, cuda_available=True) == "cuda"
    with pytest.raises(ConfigError, match=r"quantization.method: fp8-dynamic needs cuda .* int8-dynamic"):
        resolve_device(config, cuda_available=False)
    with pytest.raises(ConfigError, match="device: cuda"):
        resolve_device(parse_config(_with(device="cuda")), cuda_available=False)
    assert resolve_device(parse_config(_with(quantization={"method": "int8-dynamic"})), True) == "cpu"


def test_yaml_and_json_files_read_alike(tmp_path: Path) -> None:
    data = _with(quantization={"method": "int8-dynamic", "maxQualityDrop": 0.05}, pruning={"method": "2:4"})
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(
        "modelDir: /models/m\nmodelName: m\nquantization: {method: int8-dynamic, maxQualityDrop: 0.05}\n"
        "pruning: {method: '2:4'}\n"
    )
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.json").pruning.target_sparsity == 0.5


def test_a_config_round_trips_through_its_camel_case_dump() -> None:
    config = parse_config(_with(limits={"maxQueuedRequests": 4}, auth={"mode": "none"}))
    assert ServerConfig.model_validate(config.model_dump(mode="json", by_alias=True)) == config
