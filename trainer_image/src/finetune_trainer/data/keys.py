"""The key of a prepared-data cache entry: the data config, the bytes of every source, the tokenizer.

Equal keys mean equal examples (preparation is deterministic), so an entry is reused exactly when nothing that
shapes the examples changed; anything else (an edited source file, another config value, another tokenizer, a
new version of the stored layout) gives a new key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from finetune_trainer.data.compliance import config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.sources import ResolvedSource

__all__ = ["LAYOUT_VERSION", "cache_key", "tokenizer_digest"]

#: Bumped whenever the stored layout or what the stages compute changes.
LAYOUT_VERSION = 1


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of what decides the token ids: the fast tokenizer's whole definition (normalizer,
    pre-tokenizer, model, post-processor) or a slow one's vocabulary, plus special tokens and the chat
    template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chatTemplate": getattr(tokenizer, "chat_template", None),
        "addBos": getattr(tokenizer, "add_bos_token", None),
        "addEos": getattr(tokenizer, "add_eos_token", None),
    }
    digest = hashlib.sha256(definition.encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(
    cfg: DataConfig, tokenizer: Any, sources: Sequence[ResolvedSource], model_license: str | None
) -> str:
    """The entry's name: 32 hex digits of SHA-256 over the layout version, config digest, tokenizer
    digest, every source (role, address, format, file hashes) and the model licence (the allowlist reads
    it)."""
    document = {
        "layout": LAYOUT_VERSION,
        "config": config_digest(cfg),
        "tokenizer": tokenizer_digest(tokenizer),
        "sources": [[s.role, s.uri, s.format, [list(h) for h in s.hashes]] for s in sources],
        "modelLicense": model_license,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:32]
