"""Data preparation entry point used by the trainer.

Public API (stable; the trainer codes against it)::

    from finetune_trainer.data import DataConfig, DataError
    from finetune_trainer.data.pipeline import PreparedData, prepare
    from finetune_trainer.data.report import DataReport, render_data_section, write_report

    prepared: PreparedData = prepare(cfg.data, tokenizer, workdir, model_license="apache-2.0")
    prepared.train / .validation / .test   # list[Example]; Example = {"input_ids": list[int],
                                           #   "attention_mask": list[int], "labels": list[int]}
                                           # labels are -100 on prompt tokens (completionOnlyLoss) and, for
                                           # kind "classification", a one-element list [class_id].
    prepared.samples["validation"]         # list[TextSample(prompt, completion)]: rendered prompt text for
                                           #   generation samples and the reference completion (<= 32 each)
    prepared.label_names                   # class names for kind "classification", else None
    prepared.report                        # DataReport; prepare() already wrote workdir/data_report.json
                                           #   and workdir/provenance.json
    render_data_section(prepared.report)   # Markdown "## Data" section for the model card

``prepare`` raises :class:`DataError` (message names the cause; ``.reason`` is a CamelCase code) for: too many
malformed rows, PII rejections above the limit, a licence not in the allowlist, an unreadable or empty source,
an empty train split. The trainer maps it to ``ExitCode.DATA_ERROR``. Examples are not padded; the collator
pads (``tokenizer.pad_token_id`` for input_ids, 0 for attention_mask, -100 for labels). ``prepare`` is
deterministic: the same config, data and tokenizer give the same examples in the same order on every rank.

Tests build a tiny tokenizer with ``trainer_image/tests/tiny_tokenizer.py`` (``make_tiny_tokenizer()``:
a character-level ``PreTrainedTokenizerFast`` with pad/eos/bos and a chatml-like chat template; no download).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.report import DataReport

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DataError", "Example", "PreparedData", "TextSample", "prepare"]


class Example(TypedDict):
    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TextSample:
    """A rendered prompt (what the model sees before generating) and its reference completion."""

    prompt: str
    completion: str


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport
    samples: dict[str, list[TextSample]] = field(default_factory=dict)
    label_names: list[str] | None = None


def prepare(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    workdir: Path,
    *,
    model_license: str | None = None,
) -> PreparedData:
    """Read, validate, clean, de-duplicate, scrub, split, render and tokenize; write the report."""
    raise NotImplementedError
