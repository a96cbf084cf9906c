"""DataConfig: defaults, aliases, refusals, and that it stays torch-free for the operator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_trainer.data.config import DataConfig


def test_minimal_config_has_documented_defaults() -> None:
    cfg = DataConfig.model_validate({"source": "/data/train.jsonl"})
    assert cfg.fields.kind == "prompt-completion"
    assert cfg.completion_only_loss is True
    assert cfg.pii.policy == "scrub"
    assert cfg.dedup.exact is True
    assert cfg.all_sources == ["/data/train.jsonl"]


def test_camel_case_and_snake_case_are_both_accepted_and_dump_is_camel_case() -> None:
    camel = DataConfig.model_validate({"source": "x", "maxSeqLength": 64, "badRows": {"maxRatio": 0.2}})
    snake = DataConfig.model_validate({"source": "x", "max_seq_length": 64, "bad_rows": {"max_ratio": 0.2}})
    assert camel == snake
    dumped = camel.model_dump(by_alias=True)
    assert dumped["maxSeqLength"] == 64
    assert dumped["badRows"] == {"maxRatio": 0.2}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"source": "x", "badrows": {}}, "badrows"),
        ({"source": "x", "pii": {"policy": "redact"}}, "policy"),
        ({"source": "x", "split": {"validation": 0.6, "test": 0.5}}, "nothing would be left"),
        (
            {"source": "x", "pii": {"extraPatterns": [{"name": "x", "pattern": "("}]}},
            "invalid regular expression",
        ),
        ({"source": "x", "pii": {"extraPatterns": [{"name": "email", "pattern": "a"}]}}, "built-in"),
        (
            {"source": "x", "augmentation": {"strategy": "template-variants", "variants": ["no slot"]}},
            "{prompt}",
        ),
        ({"source": "x", "template": "alpaca", "fields": {"kind": "chat"}}, "alpaca"),
        ({"source": "x", "packing": True, "fields": {"kind": "classification"}}, "packing"),
        ({"source": ""}, "source"),
    ],
)
def test_invalid_configs_are_refused_with_a_message_naming_the_problem(
    data: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValidationError) as info:
        DataConfig.model_validate(data)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "x", "badrows": {}}, "unknown key 'badrows' in data; did you mean 'badRows'?"),
        (
            {"source": "x", "pii": {"polcy": "scrub"}},
            "unknown key 'polcy' in data.pii; did you mean 'policy'?",
        ),
        ({"source": "x", "dedup": {"nearTreshold": 0.9}}, "in data.dedup; did you mean 'nearThreshold'?"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_valid_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        DataConfig.model_validate(data)


def test_explicit_split_sources_free_their_ratio() -> None:
    cfg = DataConfig.model_validate(
        {"source": "x", "split": {"validation": 0.6, "test": 0.5, "validationSource": "v.jsonl"}}
    )
    assert cfg.split.validation_source == "v.jsonl"


def _descriptions_missing(schema: dict[str, Any]) -> list[str]:
    missing = []
    for name, definition in {"DataConfig": schema, **schema.get("$defs", {})}.items():
        for field, prop in definition.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{field}")
    return missing


def test_every_field_has_a_description() -> None:
    assert _descriptions_missing(DataConfig.model_json_schema(by_alias=True)) == []


def test_importing_the_config_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, finetune_trainer.data.config, finetune_trainer.data.report; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"
