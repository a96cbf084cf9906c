"""What every trainer-config section shares: camelCase keys, snake_case accepted, unknown keys refused.

Torch-free and dependency-light: both ``finetune_trainer.config`` and ``finetune_trainer.data.config`` build
on it (the data section is embedded in the trainer config, so neither may import the other for this).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


def valid_keys(model: type[BaseModel]) -> list[str]:
    keys: list[str] = []
    for name, info in model.model_fields.items():
        keys.append(info.alias or name)
        if info.alias and info.alias != name:
            keys.append(name)
    return keys


def suggest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The closest valid key to ``key`` (case-insensitive difflib match), or None."""
    lowered = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def unknown_key_message(key: str, section: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    where = f" in {section}" if section else ""
    suggestion = suggest_key(key, candidates)
    if suggestion:
        return f"unknown key {key!r}{where}; did you mean {suggestion!r}?"
    preferred = sorted({c for c in candidates if "_" not in c})
    return f"unknown key {key!r}{where}; valid keys: {', '.join(preferred)}"


class ConfigSection(BaseModel):
    """Base of every section: camelCase aliases, snake_case accepted, unknown keys refused with a hint."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=False,
    )

    #: Name of the section in messages ("hyperparameters", "lora"...). Empty for the root.
    section_name: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            valid = valid_keys(cls)
            for key in data:
                if isinstance(key, str) and key not in valid:
                    raise PydanticCustomError(
                        "unknown_key",
                        unknown_key_message(key, cls.section_name, valid),
                    )
        return data
