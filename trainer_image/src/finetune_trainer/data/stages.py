"""The per-row work of preparation as batched functions over Arrow tables (run by ``datasets.Dataset.map``,
in several processes): what each row is after reading, cleaning, PII and the split; then its token ids.

Every function takes a ``pyarrow.Table`` batch and returns one with a row for every input row (nothing is
dropped here: a removed row says why, and the sequential passes in :mod:`finetune_trainer.data.pipeline`
count it), so the order of rows — and with it every "first copy wins" rule — is the order of the sources.

Columns of the read table (:data:`READ_SCHEMA`): ``source`` (index of the input file), ``line``, ``role``
(index into :data:`ROLES`), ``raw`` (a JSONL line, parsed here) or ``record`` (a row a reader already mapped,
:meth:`Record.dumps`), ``error`` (a malformed row's reason).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from finetune_trainer.data.augmentation import augmented_copy
from finetune_trainer.data.cleaning import clean_record, length_violation
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.encoding import encode_columns
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.mapping import MappingError, Record, map_row
from finetune_trainer.data.pii import PiiDetector
from finetune_trainer.data.split import SPLITS, assign_split
from finetune_trainer.data.templates import render

__all__ = [
    "ENCODED_SCHEMA",
    "READ_SCHEMA",
    "ROLES",
    "ROWS_SCHEMA",
    "encode_rows",
    "examine_rows",
    "minhash_values",
]

#: The role of a source: the main data, or an explicit held-out file (its index is the split's).
ROLES = ("main", "validation", "test")
#: Bytes of the SHA-256 content digest kept for exact de-duplication (2^-64 collision odds at 10^9 rows).
DIGEST_BYTES = 16

READ_SCHEMA = pa.schema(
    [
        ("source", pa.int32()),
        ("line", pa.int64()),
        ("role", pa.int8()),
        ("raw", pa.large_binary()),
        ("record", pa.large_string()),
        ("error", pa.large_string()),
    ]
)
ROWS_SCHEMA = pa.schema(
    [
        ("error", pa.large_string()),
        ("removed", pa.string()),
        ("pii", pa.string()),
        ("record", pa.large_string()),
        ("digest", pa.binary(DIGEST_BYTES)),
        ("split", pa.int8()),
        ("label", pa.string()),
        ("minhash", pa.binary()),
    ]
)
ENCODED_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("dropped", pa.string()),
        ("truncated", pa.bool_()),
        ("loss_tokens", pa.int32()),
        ("length", pa.int32()),
    ]
)


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None


def minhash_values(record: Record, cfg: DataConfig) -> bytes:
    """The near-duplicate signature of a record (datasketch MinHash values: 32-bit)."""
    import numpy as np
    from datasketch import MinHash

    from finetune_trainer.data.dedup import shingles

    signature = MinHash(num_perm=cfg.dedup.num_perm, seed=1)
    signature.update_batch(list(shingles("\n".join(record.texts()), cfg.dedup.shingle_size)))
    return bytes(np.asarray(signature.hashvalues, dtype=np.uint32).tobytes())


def examine_rows(batch: pa.Table, *, cfg: DataConfig, sources: list[str]) -> pa.Table:
    """Parse, map, clean, scrub and place (split) every row of a read batch; see :data:`ROWS_SCHEMA`."""
    detector = PiiDetector(cfg.pii)
    out: dict[str, list[Any]] = {name: [] for name in ROWS_SCHEMA.names}
    columns = batch.to_pydict()
    for source, line, role, raw, mapped, error in zip(
        columns["source"],
        columns["line"],
        columns["role"],
        columns["raw"],
        columns["record"],
        columns["error"],
        strict=True,
    ):
        record: Record | None = None
        if error is None and mapped is not None:
            record = Record.loads(mapped, source=sources[source], line=line)
        elif error is None:
            data, error = _parse(raw)
            if data is not None:
                try:
                    record = map_row(data, cfg.fields, source=sources[source], line=line)
                except MappingError as exc:
                    error = str(exc)
        removed = pii = None
        if record is not None:
            record = clean_record(record, cfg.cleaning)
            removed = length_violation(record, cfg.cleaning)
        if record is not None and removed is None:
            found: dict[str, int] = {}

            def scrub(text: str, found: dict[str, int] = found) -> str:
                result = detector.scan(text)
                for kind, n in result.counts.items():
                    found[kind] = found.get(kind, 0) + n
                return result.text

            scrubbed = record.map_texts(scrub)
            if found:
                pii = json.dumps(found, sort_keys=True)
            if cfg.pii.policy == "scrub":
                record = scrubbed
        keep = record is not None and removed is None
        out["error"].append(error)
        out["removed"].append(removed)
        out["pii"].append(pii)
        out["record"].append(record.dumps() if keep and record is not None else None)
        if keep and record is not None:
            digest = hashlib.sha256(record.content().encode()).hexdigest()
            out["digest"].append(bytes.fromhex(digest[: 2 * DIGEST_BYTES]))
            place = ROLES[role] if role else assign_split(record.split_key(digest), cfg.split)
            out["split"].append(SPLITS.index(place))
            out["label"].append(record.label)
            out["minhash"].append(minhash_values(record, cfg) if cfg.dedup.near else None)
        else:
            out["digest"].append(None)
            out["split"].append(None)
            out["label"].append(None)
            out["minhash"].append(None)
    return pa.Table.from_pydict(out, schema=ROWS_SCHEMA)


def encode_rows(
    batch: pa.Table,
    *,
    cfg: DataConfig,
    tokenizer: Any,
    rows_paths: list[str],
    label_index: dict[str, int] | None,
    vocabulary: list[str] | None = None,
) -> pa.Table:
    """Render and tokenize planned rows (``row``: index in the examined table, ``copy``: 0 for the row,
    i > 0 for augmentation copy i: a prompt variant, or the row's text perturbed with words of
    ``vocabulary``, see :func:`augmented_copy`); see :data:`ENCODED_SCHEMA`. An augmentation copy
    identical to its row is ``dropped = "identical_copy"`` (not a row at all: never counted)."""
    import numpy as np

    from finetune_trainer.data.store import tables

    records = tables([Path(p) for p in rows_paths]).column("record")
    rows = batch.column("row").to_numpy()
    copies = batch.column("copy").to_pylist()
    texts = records.take(pa.array(rows)).to_pylist()
    planned: list[Record | None] = []
    for row, text, copy in zip(rows.tolist(), texts, copies, strict=True):
        record = Record.loads(text)
        if copy:
            rewritten = augmented_copy(record, cfg.augmentation, vocabulary or [], row=row, copy=copy)
            planned.append(rewritten if rewritten != record else None)
        else:
            planned.append(record)
    kept = [r for r in planned if r is not None]
    try:
        rendered = [render(r, cfg, tokenizer) for r in kept]
    except ValueError as exc:
        raise DataError(
            f"cannot render rows with template {cfg.template!r}: {exc}", reason="TemplateError"
        ) from exc
    class_ids = (
        [label_index[r.label] if r.label is not None else None for r in kept]
        if label_index is not None
        else None
    )
    columns = encode_columns(
        rendered,
        tokenizer,
        max_length=cfg.max_seq_length,
        truncation=cfg.truncation,
        completion_only=cfg.completion_only_loss and cfg.fields.kind != "text",
        add_eos=cfg.add_eos and cfg.fields.kind != "classification",
        add_special_tokens=cfg.template != "tokenizer",
        class_ids=class_ids,
    )
    # Re-insert empty rows for identical copies so that every planned row has its output row.
    present = np.asarray([r is not None for r in planned], dtype=bool)
    n = len(planned)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[present] = np.diff(columns.offsets)
    label_lengths = np.zeros(n, dtype=np.int64)
    label_lengths[present] = np.diff(columns.label_offsets)
    dropped: list[str | None] = ["identical_copy"] * n
    truncated = [False] * n
    loss = [0] * n
    for target, source in zip(np.flatnonzero(present).tolist(), range(len(kept)), strict=True):
        dropped[target] = columns.dropped[source]
        truncated[target] = columns.truncated[source]
        loss[target] = columns.loss_tokens[source]
    ids = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), pa.array(columns.ids)
    )
    labels = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(label_lengths)]).astype(np.int32)),
        pa.array(columns.labels),
    )
    return pa.Table.from_arrays(
        [
            ids,
            labels,
            pa.array(dropped, type=pa.string()),
            pa.array(truncated, type=pa.bool_()),
            pa.array(loss, type=pa.int32()),
            pa.array(lengths.astype(np.int32)),
        ],
        schema=ENCODED_SCHEMA,
    )
