"""Templates, loss masking on the prompt, truncation, packing, classification and augmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.encoding import IGNORE_INDEX, Example
from finetune_trainer.data.mapping import Message, Record
from finetune_trainer.data.pipeline import PreparedData, prepare
from finetune_trainer.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, render
from tiny_tokenizer import make_tiny_tokenizer

TOKENIZER = make_tiny_tokenizer()
NO_HOLDOUT = {"validation": 0.0, "test": 0.0}


def _cfg(**overrides: Any) -> DataConfig:
    return DataConfig.model_validate({"source": "unused", **overrides})


def _prepare(tmp_path: Path, rows: list[dict[str, Any]], **overrides: Any) -> PreparedData:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides.setdefault("split", NO_HOLDOUT)
    return prepare(_cfg(source=str(path), **overrides), TOKENIZER, tmp_path / "work")


def _loss_text(example: Example) -> str:
    return str(TOKENIZER.decode([t for t in example["labels"] if t != IGNORE_INDEX]))


def _prompt_text(example: Example) -> str:
    prompt = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX
    ]
    return str(TOKENIZER.decode(prompt))


PC = Record("s", 1, "prompt-completion", parts={"prompt": "Add 2 and 3", "completion": "5"})
INSTRUCTION = Record(
    "s", 1, "instruction", parts={"instruction": "Translate", "input": "bonjour", "output": "hello"}
)
CHAT = Record(
    "s",
    1,
    "chat",
    messages=(
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "bye"),
        Message("assistant", "ciao"),
    ),
)


def _spans(text: str, spans: tuple[tuple[int, int], ...]) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_plain_rendering() -> None:
    rendered = render(PC, _cfg())
    assert rendered.text == "Add 2 and 3\n5"
    assert _spans(rendered.text, rendered.spans) == ["5"]
    assert rendered.prompt_text == "Add 2 and 3\n"


def test_alpaca_rendering_with_and_without_input() -> None:
    with_input = render(INSTRUCTION, _cfg(template="alpaca"))
    prompt = ALPACA_PROMPT_WITH_INPUT.replace("{instruction}", "Translate").replace("{input}", "bonjour")
    assert with_input.text == prompt + "hello"
    assert prompt.endswith("### Input:\nbonjour\n\n### Response:\n")
    assert _spans(with_input.text, with_input.spans) == ["hello"]
    without = render(PC, _cfg(template="alpaca"))
    assert without.text == ALPACA_PROMPT.replace("{instruction}", "Add 2 and 3") + "5"
    assert "### Input:" not in without.text


def test_chatml_rendering_with_system_prompt_and_every_assistant_turn_trainable() -> None:
    rendered = render(CHAT, _cfg(template="chatml", systemPrompt="Be brief."))
    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n"
        "<|im_start|>assistant\nciao<|im_end|>"
    )
    assert _spans(rendered.text, rendered.spans) == ["hello<|im_end|>", "ciao<|im_end|>"]
    assert rendered.prompt_text.endswith("<|im_start|>assistant\n")


def test_tokenizer_chat_template_matches_chatml_for_a_chatml_tokenizer() -> None:
    ours = render(CHAT, _cfg(template="chatml"))
    theirs = render(CHAT, _cfg(template="tokenizer"), TOKENIZER)
    assert theirs.text.rstrip("\n") == ours.text
    assert _spans(theirs.text, theirs.spans) == _spans(ours.text, ours.spans)


def test_labels_are_masked_on_the_prompt(tmp_path: Path) -> None:
    rows = [{"prompt": "Add 2 and 3", "completion": "5"}, {"prompt": "Add 4 and 4", "completion": "8"}]
    prepared = _prepare(tmp_path, rows, template="alpaca")
    first = prepared.train[0]
    assert len(first["input_ids"]) == len(first["labels"]) == len(first["attention_mask"])
    assert _loss_text(first) == "5</s>"
    assert _prompt_text(first).endswith("### Response:\n")
    assert first["labels"][: len(first["labels"]) - 2] == [IGNORE_INDEX] * (len(first["labels"]) - 2)


def test_full_sequence_loss_when_completion_only_is_off(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, [{"prompt": "p", "completion": "c"}], completionOnlyLoss=False)
    (example,) = prepared.train
    assert example["labels"] == example["input_ids"]


def test_chat_rows_learn_only_assistant_turns(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": m.role, "content": m.content} for m in CHAT.messages]}]
    prepared = _prepare(tmp_path, rows, template="chatml", fields={"kind": "chat"})
    assert _loss_text(prepared.train[0]) == "hello<|im_end|>ciao<|im_end|></s>"
    tokenizer_template = _prepare(tmp_path / "t", rows, template="tokenizer", fields={"kind": "chat"})
    assert _loss_text(tokenizer_template.train[0]) == "hello<|im_end|>ciao<|im_end|>"


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion(tmp_path: Path) -> None:
    rows = [{"prompt": "x" * 40 + "END", "completion": "answer"}]
    prepared = _prepare(tmp_path, rows, maxSeqLength=16)
    (example,) = prepared.train
    assert len(example["input_ids"]) == 16
    assert _loss_text(example) == "answer</s>"
    assert _prompt_text(example).endswith("END\n")
    assert prepared.report.splits["train"].truncated == 1


def test_drop_policy_removes_long_rows_and_counts_them(tmp_path: Path) -> None:
    rows = [{"prompt": "x" * 40, "completion": "long"}, {"prompt": "short", "completion": "ok"}]
    prepared = _prepare(tmp_path, rows, maxSeqLength=16, truncation="drop")
    assert len(prepared.train) == 1
    tokenize = next(s for s in prepared.report.stages if s.name == "tokenize")
    assert tokenize.removed == {"too_many_tokens": 1}


def test_packing_fills_blocks_and_keeps_the_masking(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    unpacked = _prepare(tmp_path / "u", rows, maxSeqLength=16)
    packed = _prepare(tmp_path / "p", rows, maxSeqLength=16, packing=True)
    total = sum(len(e["input_ids"]) for e in unpacked.train)
    assert [len(b["input_ids"]) for b in packed.train[:-1]] == [16] * (len(packed.train) - 1)
    assert sum(len(b["input_ids"]) for b in packed.train) == total
    loss_tokens = sum(t != IGNORE_INDEX for e in unpacked.train for t in e["labels"])
    assert sum(t != IGNORE_INDEX for b in packed.train for t in b["labels"]) == loss_tokens
    assert packed.report.splits["train"].packed_blocks == len(packed.train)


def test_instruction_rows_and_plain_template(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Hi", "output": "Hey"},
    ]
    prepared = _prepare(tmp_path, rows, fields={"kind": "instruction"})
    assert TOKENIZER.decode(prepared.train[0]["input_ids"]) == "Translate\n\nbonjour\nhello</s>"
    assert TOKENIZER.decode(prepared.train[1]["input_ids"]) == "Hi\nHey</s>"


def test_text_rows_learn_every_token(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, [{"text": "all of it"}], fields={"kind": "text"})
    (example,) = prepared.train
    assert example["labels"] == example["input_ids"]


def test_classification_rows_get_class_ids(tmp_path: Path) -> None:
    rows = [
        {"text": "great film", "label": "pos"},
        {"text": "awful film", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]
    prepared = _prepare(tmp_path, rows, fields={"kind": "classification"})
    assert prepared.label_names == ["neg", "pos"]
    assert [e["labels"] for e in prepared.train] == [[1], [0], [1]]
    assert prepared.report.label_names == ["neg", "pos"]


def test_augmentation_adds_prompt_variants_to_train_only(tmp_path: Path) -> None:
    rows = [{"prompt": f"What is {i} squared?", "completion": str(i * i)} for i in range(40)]
    augmentation = {"strategy": "template-variants", "copies": 1, "variants": ["{prompt}", "Q: {prompt}"]}
    prepared = _prepare(tmp_path, rows, augmentation=augmentation)
    assert len(prepared.train) == 80
    assert prepared.report.augmented_rows == 40
    augment = next(s for s in prepared.report.stages if s.name == "augment (train)")
    assert (augment.rows_in, augment.rows_out) == (40, 80)
    assert TOKENIZER.decode(prepared.train[40]["input_ids"]) == "Q: What is 0 squared?\n0</s>"
    held_out = {"validation": 0.25, "test": 0.25}
    split = _prepare(tmp_path / "s", rows, augmentation=augmentation, split=held_out)
    held = split.validation + split.test
    assert not any(TOKENIZER.decode(e["input_ids"]).startswith("Q:") for e in held)
    assert len(split.train) == 2 * (40 - len(held))


def test_generation_samples_hold_rendered_prompts_and_references(tmp_path: Path) -> None:
    rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(60)]
    prepared = _prepare(tmp_path, rows, template="chatml")
    sample = prepared.samples["train"][0]
    assert sample.prompt == "<|im_start|>user\nSay 0<|im_end|>\n<|im_start|>assistant\n"
    assert sample.completion == "0"


def test_tokenizer_template_without_a_chat_template_is_a_data_error(tmp_path: Path) -> None:
    from finetune_trainer.data.errors import DataError

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match="chat template"):
        prepare(_cfg(source=str(path), template="tokenizer", split=NO_HOLDOUT), tokenizer, tmp_path / "w")
