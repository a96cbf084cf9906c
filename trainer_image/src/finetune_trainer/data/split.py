"""Deterministic, append-stable split.

A row's split is a pure function of its key (its id column, or the digest of its mapped content) and the seed:
``u = sha256(f"{seed}:{key}") / 2**256`` in [0, 1); ``u < validation`` → validation, ``u < validation + test``
→ test, else train. Appending rows, removing other rows or reordering the file never moves an existing row.
Changing the seed or the ratios does (by design: they define the split).
"""

from __future__ import annotations

import hashlib

from finetune_trainer.data.config import SplitConfig

__all__ = ["SPLITS", "assign_split", "split_point"]

SPLITS = ("train", "validation", "test")


def split_point(key: str, seed: int) -> float:
    """Where the key falls in [0, 1): uniform over keys, independent between seeds."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, cfg: SplitConfig) -> str:
    """train, validation or test for a row of the main source. Explicit split sources take that split's
    share to zero: with validationSource set, main rows only go to train or test."""
    validation = 0.0 if cfg.validation_source else cfg.validation
    test = 0.0 if cfg.test_source else cfg.test
    u = split_point(key, cfg.seed)
    if u < validation:
        return "validation"
    if u < validation + test:
        return "test"
    return "train"
