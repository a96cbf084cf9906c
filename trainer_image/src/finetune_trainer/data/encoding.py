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

__all__ = ["IGNORE_INDEX", "Encoded", "EncodedColumns", "Example", "encode_batch", "encode_columns", "pack"]

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


@dataclass
class EncodedColumns:
    """A batch of encoded examples as flat arrays: row ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (labels
    alike, or one class id per row for classification). A dropped row is empty and names its reason."""

    offsets: Any  # np.ndarray[int64], len(rows) + 1
    ids: Any  # np.ndarray[int32]
    label_offsets: Any
    labels: Any
    truncated: list[bool]
    dropped: list[str | None]
    loss_tokens: list[int]


def _flat_encodings(texts: list[str], tokenizer: Any, add_special_tokens: bool) -> tuple[Any, Any, Any]:
    """Token ids, character offsets (n, 2) and per-row lengths of a batch, straight from the fast tokenizer's
    encodings (no per-token Python objects beyond what the tokenizer hands back)."""
    import numpy as np

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    else:  # the tokenizer file configures padding/truncation: let transformers switch them off
        encodings = tokenizer(
            texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        ).encodings
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
    spans = np.fromiter(
        itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings)),
        dtype=np.int64,
        count=2 * total,
    ).reshape(-1, 2)
    return ids, spans, lengths


def _trainable_flat(rendered: Sequence[Rendered], offsets: Any, lengths: Any) -> Any:
    """Vectorised :func:`_trainable_tokens` over a whole batch: rows are laid side by side on one axis
    (row r at r * stride), so one ``searchsorted`` finds each token's first loss span ending after it."""
    import numpy as np

    stride = max((len(r.text) for r in rendered), default=0) + 1
    rows = np.repeat(np.arange(len(rendered), dtype=np.int64), lengths)
    starts = offsets[:, 0] + rows * stride
    ends = offsets[:, 1] + rows * stride
    span_list = [
        (index * stride + start, index * stride + end)
        for index, item in enumerate(rendered)
        for start, end in item.spans
    ]
    if not span_list:
        return np.zeros(len(rows), dtype=bool)
    span_array = np.asarray(span_list, dtype=np.int64)
    found = np.searchsorted(span_array[:, 1], starts, side="right")
    inside = found < len(span_array)
    span_starts = span_array[np.minimum(found, len(span_array) - 1), 0]
    return (offsets[:, 1] > offsets[:, 0]) & inside & (span_starts < ends)


def encode_columns(
    rendered: Sequence[Rendered],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str,
    completion_only: bool,
    add_eos: bool,
    add_special_tokens: bool,
    class_ids: Sequence[int | None] | None = None,
) -> EncodedColumns:
    """:func:`encode_batch` with the same results, as flat arrays (what the Arrow store keeps).

    ``class_ids`` (classification): the label of each row is its class id, and a row without loss tokens is
    kept (the label is the target, not the tokens)."""
    import numpy as np

    if not getattr(tokenizer, "is_fast", False):
        return _columns_from_examples(
            encode_batch(
                rendered,
                tokenizer,
                max_length=max_length,
                truncation=truncation,
                completion_only=completion_only,
                add_eos=add_eos,
                add_special_tokens=add_special_tokens,
            ),
            class_ids,
        )
    ids, spans, lengths = _flat_encodings([r.text for r in rendered], tokenizer, add_special_tokens)
    trainable = _trainable_flat(rendered, spans, lengths)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    eos = getattr(tokenizer, "eos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if add_eos and eos is not None:
        last = ids[np.maximum(bounds[1:] - 1, 0)] if len(ids) else np.full(len(lengths), -1)
        needs = np.array([not r.self_terminated for r in rendered], dtype=bool) & (
            (lengths == 0) | (last != eos)
        )
        where = bounds[1:][needs]
        ids = np.insert(ids, where, eos)
        trainable = np.insert(trainable, where, True)
        lengths = lengths + needs
        bounds = np.concatenate([[0], np.cumsum(lengths)])
    if not completion_only:
        trainable = np.ones(len(ids), dtype=bool)
    truncated = [False] * len(rendered)
    dropped: list[str | None] = [None] * len(rendered)
    keep = np.ones(len(ids), dtype=bool)
    pieces: dict[int, tuple[Any, Any]] = {}
    for row in np.flatnonzero(lengths > max_length).tolist():
        if truncation == "drop":
            dropped[row] = "too_many_tokens"
            keep[bounds[row] : bounds[row + 1]] = False
            continue
        row_ids = ids[bounds[row] : bounds[row + 1]].tolist()
        row_trainable = trainable[bounds[row] : bounds[row + 1]].tolist()
        cut_ids, cut_trainable = _truncate(row_ids, row_trainable, max_length, special)
        pieces[row] = (np.asarray(cut_ids, dtype=np.int64), np.asarray(cut_trainable, dtype=bool))
        truncated[row] = True
    if pieces:
        row_ids_list, row_trainable_list = [], []
        for row in range(len(rendered)):
            if row in pieces:
                row_ids_list.append(pieces[row][0])
                row_trainable_list.append(pieces[row][1])
            elif dropped[row] is None:
                row_ids_list.append(ids[bounds[row] : bounds[row + 1]])
                row_trainable_list.append(trainable[bounds[row] : bounds[row + 1]])
            else:
                row_ids_list.append(ids[:0])
                row_trainable_list.append(trainable[:0])
        lengths = np.fromiter((len(p) for p in row_ids_list), dtype=np.int64, count=len(rendered))
        ids = np.concatenate(row_ids_list) if row_ids_list else ids[:0]
        trainable = np.concatenate(row_trainable_list) if row_trainable_list else trainable[:0]
    elif not keep.all():
        ids, trainable = ids[keep], trainable[keep]
        lengths = np.where(np.asarray([d is not None for d in dropped]), 0, lengths)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    running = np.concatenate([[0], np.cumsum(trainable, dtype=np.int64)])
    loss_tokens = [int(n) for n in running[bounds[1:]] - running[bounds[:-1]]]
    labels = np.where(trainable, ids, IGNORE_INDEX)
    if class_ids is None:
        empty = [r for r in range(len(rendered)) if dropped[r] is None and loss_tokens[r] == 0]
    else:
        empty = [r for r in range(len(rendered)) if dropped[r] is None and lengths[r] == 0]
    if empty:
        for row in empty:
            dropped[row] = "no_loss_tokens"
        mask = np.repeat(np.asarray([d is None for d in dropped]), lengths)
        ids, labels = ids[mask], labels[mask]
        lengths = np.where(np.asarray([d is not None for d in dropped]), 0, lengths)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        loss_tokens = [0 if dropped[r] else n for r, n in enumerate(loss_tokens)]
    if class_ids is not None:
        kept = [d is None for d in dropped]
        labels = np.asarray([c for c, k in zip(class_ids, kept, strict=True) if k], dtype=np.int64)
        label_bounds = np.concatenate([[0], np.cumsum(np.asarray(kept, dtype=np.int64))])
        loss_tokens = [1 if k else 0 for k in kept]
    else:
        label_bounds = bounds
    return EncodedColumns(
        offsets=bounds,
        ids=ids.astype(np.int32),
        label_offsets=label_bounds,
        labels=labels.astype(np.int32),
        truncated=[t and d is None for t, d in zip(truncated, dropped, strict=True)],
        dropped=dropped,
        loss_tokens=loss_tokens,
    )


def _columns_from_examples(encoded: list[Encoded], class_ids: Sequence[int | None] | None) -> EncodedColumns:
    import numpy as np

    ids: list[int] = []
    labels: list[int] = []
    offsets, label_offsets = [0], [0]
    dropped: list[str | None] = []
    truncated: list[bool] = []
    loss_tokens: list[int] = []
    for row, result in enumerate(encoded):
        if class_ids is not None and result.dropped == "no_loss_tokens":
            result = Encoded(result.example, result.truncated, None)  # classification keeps such rows
        if result.dropped is None and result.example is None:
            raise AssertionError("an encoded example is missing")
        dropped.append(result.dropped)
        truncated.append(bool(result.truncated) and result.dropped is None)
        if result.example is not None and result.dropped is None:
            ids += result.example["input_ids"]
            if class_ids is not None:
                labels.append(int(class_ids[row] or 0))
                loss_tokens.append(1)
            else:
                labels += result.example["labels"]
                loss_tokens.append(sum(1 for t in result.example["labels"] if t != IGNORE_INDEX))
        else:
            loss_tokens.append(0)
        offsets.append(len(ids))
        label_offsets.append(len(labels))
    return EncodedColumns(
        offsets=np.asarray(offsets, dtype=np.int64),
        ids=np.asarray(ids, dtype=np.int32),
        label_offsets=np.asarray(label_offsets, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int32),
        truncated=truncated,
        dropped=dropped,
        loss_tokens=loss_tokens,
    )
