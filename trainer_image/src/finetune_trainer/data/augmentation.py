"""Deterministic augmentation of the training split: prompt variants (causal LM) and EDA-style word
operations (text classification).

Word operations (Wei & Zou, 2019, "EDA"), applied to a copy of a row in this order, each word by word with
its probability from :class:`TextAugmentationConfig`: synonym replacement from the supplied table, insertion
of a random word of the training split's vocabulary, a swap with the next word, deletion (one word always
stays). Words are whitespace-separated and the result is joined with single spaces. The randomness of copy
``c`` of row ``r`` comes from ``(seed, r, c)`` only, so a row's copies are the same in every process, on
every rank and at every preparation of the same data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from finetune_trainer.data.config import AugmentationConfig, TextAugmentationConfig
from finetune_trainer.data.mapping import Message, Record

__all__ = [
    "augment",
    "augment_text",
    "augmentation_copies",
    "augmented_copy",
    "perturb_words",
    "text_vocabulary",
    "with_prompt",
]

#: What counts as a vocabulary word for insertion: letters (any script), apostrophes and hyphens inside.
_WORD = re.compile(r"^[^\W\d_]+(?:['-][^\W\d_]+)*$")


def with_prompt(record: Record, variant: str) -> Record:
    def rewrite(prompt: str) -> str:
        return variant.replace("{prompt}", prompt)

    if record.kind == "prompt-completion":
        return replace(record, parts={**record.parts, "prompt": rewrite(record.parts["prompt"])})
    if record.kind == "instruction":
        return replace(record, parts={**record.parts, "instruction": rewrite(record.parts["instruction"])})
    if record.kind == "chat":
        messages = list(record.messages)
        last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
        user = next((i for i in range(last_assistant - 1, -1, -1) if messages[i].role == "user"), None)
        if user is None:
            return record
        messages[user] = Message("user", rewrite(messages[user].content))
        return replace(record, messages=tuple(messages))
    return record


def augment(records: list[Record], cfg: AugmentationConfig) -> list[Record]:
    """The original rows followed by ``copies`` rewritten copies of each (copy i uses variant i mod len);
    copies identical to their original are skipped."""
    if cfg.strategy == "none" or cfg.copies == 0:
        return list(records)
    extra = []
    for copy in range(1, cfg.copies + 1):
        variant = cfg.variants[copy % len(cfg.variants)]
        for record in records:
            rewritten = with_prompt(record, variant)
            if rewritten != record:
                extra.append(rewritten)
    return [*records, *extra]


def text_vocabulary(texts: Iterable[str]) -> tuple[str, ...]:
    """The sorted lower-case words of ``texts`` (letters only: no numbers, no punctuation-only tokens)."""
    words = {word.lower() for text in texts for word in text.split() if _WORD.match(word)}
    return tuple(sorted(words))


def perturb_words(
    words: Sequence[str], cfg: TextAugmentationConfig, vocabulary: Sequence[str], rng: random.Random
) -> list[str]:
    """One EDA pass over ``words`` (see the module docstring); ``vocabulary`` feeds insertion."""
    out = list(words)
    if cfg.synonym_replacement > 0:
        for i, word in enumerate(out):
            options = cfg.synonyms.get(word.lower())
            if options and rng.random() < cfg.synonym_replacement:
                out[i] = rng.choice(options)
    if cfg.word_insertion > 0 and vocabulary:
        inserted: list[str] = []
        for word in out:
            inserted.append(word)
            if rng.random() < cfg.word_insertion:
                inserted.append(vocabulary[rng.randrange(len(vocabulary))])
        out = inserted
    if cfg.word_swap > 0:
        for i in range(len(out) - 1):
            if rng.random() < cfg.word_swap:
                out[i], out[i + 1] = out[i + 1], out[i]
    if cfg.word_dropout > 0 and len(out) > 1:
        kept = [word for word in out if rng.random() >= cfg.word_dropout]
        out = kept or [out[rng.randrange(len(out))]]
    return out


def augment_text(
    record: Record, cfg: TextAugmentationConfig, vocabulary: Sequence[str], *, seed: int, row: int, copy: int
) -> Record:
    """Copy ``copy`` (>= 1) of the record at examined row ``row``: every text part perturbed."""
    rng = random.Random(f"fto-text-augmentation:{seed}:{row}:{copy}")
    parts = {
        name: " ".join(perturb_words(value.split(), cfg, vocabulary, rng))
        for name, value in sorted(record.parts.items())
    }
    return replace(record, parts={name: parts[name] for name in record.parts})


def augmented_copy(
    record: Record, cfg: AugmentationConfig, vocabulary: Sequence[str], *, row: int, copy: int
) -> Record:
    """Copy ``copy`` (>= 1) of the record at examined row ``row``: its text perturbed (``cfg.text``) or its
    prompt rewritten with variant ``copy`` mod len (strategy template-variants)."""
    if cfg.text is not None:
        return augment_text(record, cfg.text, vocabulary, seed=cfg.seed, row=row, copy=copy)
    return with_prompt(record, cfg.variants[copy % len(cfg.variants)])


def augmentation_copies(cfg: AugmentationConfig) -> int:
    """Extra copies of each training row the preparation makes (0 when nothing augments text rows)."""
    return cfg.copies if cfg.strategy != "none" or cfg.text is not None else 0
