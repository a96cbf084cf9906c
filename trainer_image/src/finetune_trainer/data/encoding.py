"""Rendered text → token ids, attention mask and labels (-100 outside the loss spans); truncation; packing.

With a fast tokenizer the whole text is tokenized once and each token's character offsets decide whether it
carries the loss, so the ids are exactly what the tokenizer gives for the full text (no boundary artefacts).
Slow tokenizers are tokenized segment by segment instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from finetune_trainer.data.templates import Rendered

__all__ = ["IGNORE_INDEX", "Encoded", "Example", "encode_batch", "pack"]

IGNORE_INDEX = -100


class Example(TypedDict):
    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]


@dataclass
class Encoded:
    """One encoded example, or why it was dropped."""

    example: Example | None
    truncated: bool = False
    dropped: str | None = None


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return end > start and any(start < span_end and end > span_start for span_start, span_end in spans)


def _trainable_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token's character range, whether it overlaps a loss span. Offsets and spans are both in text
    order, so one sweep suffices; special tokens have empty ranges and never carry the loss."""
    trainable = []
    index = 0
    for start, end in offsets:
        if end <= start:
            trainable.append(False)
            continue
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        trainable.append(index < len(spans) and spans[index][0] < end)
    return trainable


def _token_ids_and_mask(
    rendered: Rendered, tokenizer: Any, encoding: Any, add_special: bool
) -> tuple[list[int], list[bool]]:
    if encoding is not None:
        ids = list(encoding["input_ids"])
        return ids, _trainable_tokens(encoding["offset_mapping"], rendered.spans)
    ids, trainable = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_special and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids.append(bos)
        trainable.append(False)
    boundaries = sorted({0, len(rendered.text), *(p for span in rendered.spans for p in span)})
    for start, end in itertools.pairwise(boundaries):
        piece_ids = tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"]
        ids += piece_ids
        trainable += [_overlaps(start, end, rendered.spans)] * len(piece_ids)
    return ids, trainable


def encode_batch(
    rendered: Sequence[Rendered],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str,
    completion_only: bool,
    add_eos: bool,
    add_special_tokens: bool,
) -> list[Encoded]:
    """Encode many rendered examples (batched through a fast tokenizer)."""
    encodings: list[Any] = [None] * len(rendered)
    if getattr(tokenizer, "is_fast", False) and rendered:
        batch = tokenizer(
            [r.text for r in rendered],
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        encodings = [
            {"input_ids": ids, "offset_mapping": offsets}
            for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
        ]
    eos = getattr(tokenizer, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    results = []
    for item, encoding in zip(rendered, encodings, strict=True):
        ids, trainable = _token_ids_and_mask(item, tokenizer, encoding, add_special_tokens)
        if add_eos and not item.self_terminated and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            trainable.append(True)
        if not completion_only:
            trainable = [True] * len(ids)
        truncated = False
        if len(ids) > max_length:
            if truncation == "drop":
                results.append(Encoded(None, dropped="too_many_tokens"))
                continue
            ids, trainable = _truncate(ids, trainable, max_length, special)
            truncated = True
        if not any(trainable):
            results.append(Encoded(None, dropped="no_loss_tokens"))
            continue
        labels = [token if train else IGNORE_INDEX for token, train in zip(ids, trainable, strict=True)]
        results.append(
            Encoded(Example(input_ids=ids, attention_mask=[1] * len(ids), labels=labels), truncated)
        )
    return results


def _truncate(
    ids: list[int], trainable: list[bool], max_length: int, special: set[int]
) -> tuple[list[int], list[bool]]:
    """Cut the prompt from the left first (after a leading special token such as BOS), then the end."""
    excess = len(ids) - max_length
    keep_head = 1 if ids and ids[0] in special else 0
    first_loss = next((i for i, t in enumerate(trainable) if t), len(ids))
    cut = max(0, min(excess, first_loss - keep_head))
    if cut:
        ids = ids[:keep_head] + ids[keep_head + cut :]
        trainable = trainable[:keep_head] + trainable[keep_head + cut :]
    return ids[:max_length], trainable[:max_length]


def pack(examples: Sequence[Example], block_size: int) -> tuple[list[Example], int]:
    """Concatenate examples and cut the stream into blocks of ``block_size`` (the last block may be shorter).

    Tokens attend across example boundaries inside a block (the usual trade-off of packing); labels keep each
    example's masking, so prompts still carry no loss.
    """
    blocks: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids += example["input_ids"]
        labels += example["labels"]
        while len(ids) >= block_size:
            blocks.append(_block(ids[:block_size], labels[:block_size]))
            ids, labels = ids[block_size:], labels[block_size:]
    if ids:
        blocks.append(_block(ids, labels))
    kept = [b for b in blocks if any(label != IGNORE_INDEX for label in b["labels"])]
    return kept, len(blocks) - len(kept)


def _block(ids: list[int], labels: list[int]) -> Example:
    return Example(input_ids=ids, attention_mask=[1] * len(ids), labels=labels)
