"""Exact and near-duplicate removal. The earlier row always wins, so appending rows never removes old ones.

Near duplicates: MinHash signatures over word shingles, candidates from datasketch's MinHashLSH, confirmed by
the signatures' estimated Jaccard similarity (LSH alone admits false positives).
"""

from __future__ import annotations

import re
from typing import Any

from finetune_trainer.data.config import DedupConfig
from finetune_trainer.data.mapping import Record

__all__ = ["ExactDeduplicator", "NearDeduplicator", "shingles"]

_WORD = re.compile(r"\w+", re.UNICODE)
_CANDIDATE_FACTOR = 0.75


class ExactDeduplicator:
    """Remembers content digests; ``seen(record)`` is True for a repeat."""

    def __init__(self) -> None:
        self._digests: set[str] = set()

    def seen(self, record: Record) -> bool:
        digest = record.content_digest()
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False


def shingles(text: str, size: int) -> set[bytes]:
    """Lower-cased word n-grams; texts shorter than ``size`` words give one shingle of all their words."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


class NearDeduplicator:
    """MinHash LSH index; ``is_near_duplicate(record)`` checks against earlier records, then adds it."""

    def __init__(self, cfg: DedupConfig) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._cfg = cfg
        # LSH near its threshold misses many true pairs (its banding is a soft step), so candidates come
        # from a lower threshold and are confirmed against the real one with the Jaccard estimate.
        self._lsh = MinHashLSH(threshold=cfg.near_threshold * _CANDIDATE_FACTOR, num_perm=cfg.num_perm)
        self._signatures: dict[str, Any] = {}
        self._count = 0
        #: How this datasketch version hashes by default (signatures rebuilt from values must say it).
        self._scheme = getattr(MinHash(num_perm=cfg.num_perm, seed=1), "scheme", None)

    def _signature(self, record: Record) -> Any:
        text = "\n".join(record.texts())
        signature = self._minhash(num_perm=self._cfg.num_perm, seed=1)
        signature.update_batch(list(shingles(text, self._cfg.shingle_size)))
        return signature

    def is_near_duplicate(self, record: Record) -> bool:
        return self._check(self._signature(record))

    def is_near_duplicate_signature(self, hashvalues: Any) -> bool:
        """:meth:`is_near_duplicate` for a signature computed elsewhere (``stages.minhash_values``)."""
        signature = self._minhash(
            num_perm=self._cfg.num_perm, seed=1, hashvalues=hashvalues, scheme=self._scheme
        )
        return self._check(signature)

    def _check(self, signature: Any) -> bool:
        for key in self._lsh.query(signature):
            if signature.jaccard(self._signatures[key]) >= self._cfg.near_threshold:
                return True
        key = str(self._count)
        self._count += 1
        self._lsh.insert(key, signature)
        self._signatures[key] = signature
        return False
