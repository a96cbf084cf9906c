"""The server's configuration: a typed file (YAML or JSON), unknown keys refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ServerConfig(BaseModel):
    """What ``python -m finetune_server --config PATH`` reads."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    version: Literal["v1"] = Field("v1", description="Schema version of this file.")
    model_dir: Path = Field(
        description="Folder with a Hugging Face model + tokenizer (the artifact's model/)."
    )
    model_name: str = Field(description="Name clients use in the `model` field and that /v1/models lists.")
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP API (OpenAI and KServe v2).")
    api_keys_file: Path | None = Field(
        None,
        description="File with one accepted API key per line (a mounted Secret). Unset: no authentication.",
    )
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Upper bound for max_tokens in a request.")
    default_max_new_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype on load; auto keeps what the artifact stored."
    )
    quantization: Literal["none", "int8-dynamic"] = Field(
        "none", description="int8-dynamic: PyTorch dynamic int8 quantization of Linear layers (CPU)."
    )


def load_config(path: Path) -> ServerConfig:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return ServerConfig.model_validate(data)
