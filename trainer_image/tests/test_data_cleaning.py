"""Cleaning, length filters and de-duplication: every removal counted with its reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_trainer.data.cleaning import clean_text, strip_html
from finetune_trainer.data.config import CleaningConfig, DataConfig
from finetune_trainer.data.dedup import shingles
from finetune_trainer.data.pipeline import PreparedData, prepare
from tiny_tokenizer import make_tiny_tokenizer


def _prepare(tmp_path: Path, rows: list[dict[str, Any]], **overrides: Any) -> PreparedData:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig.model_validate(
        {
            "source": str(path),
            "split": {"validation": 0.0, "test": 0.0},
            "pii": {"policy": "allow"},
            **overrides,
        }
    )
    return prepare(cfg, make_tiny_tokenizer(), tmp_path / "work")


def _removed(prepared: PreparedData, stage: str) -> dict[str, int]:
    return next(s.removed for s in prepared.report.stages if s.name == stage)


def test_nfkc_folds_compatibility_characters() -> None:
    cfg = CleaningConfig(collapse_whitespace=False)
    assert clean_text("\ufb01le \uff21\uff22\uff23 \u2460", cfg) == "file ABC 1"
    assert clean_text("\ufb01le", CleaningConfig(normalize_unicode=False)) == "\ufb01le"


def test_whitespace_is_collapsed_but_line_structure_kept() -> None:
    text = "  a \t  b  \r\n\n\n\n  c\u00a0\u00a0d  "
    assert clean_text(text, CleaningConfig()) == "a b\n\nc d"


def test_html_is_stripped_with_script_content_and_entities() -> None:
    html_text = (
        "<div><p>Hello&nbsp;<b>world</b> &amp; co</p><script>alert('x')</script><style>p{}</style></div>"
    )
    assert clean_text(html_text, CleaningConfig(strip_html=True)) == "Hello world & co"
    assert strip_html("3 < 4 and 5 > 2") == "3 < 4 and 5 > 2"


def test_length_filters_remove_rows_and_say_why(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p1", "completion": "fine answer"},
        {"prompt": "p2", "completion": "   "},  # empty after cleaning
        {"prompt": "p3", "completion": "ab"},  # shorter than minChars
        {"prompt": "p4" * 50, "completion": "long prompt makes it too long"},
        {"prompt": "p5", "completion": "another fine one"},
    ]
    prepared = _prepare(tmp_path, rows, cleaning={"minChars": 3, "maxChars": 60})
    assert _removed(prepared, "clean") == {"empty": 1, "too_short": 1, "too_long": 1}
    assert len(prepared.train) == 2


def test_exact_duplicates_after_cleaning_are_removed_and_the_first_copy_kept(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hello  world", "completion": "one"},
        {"prompt": "Hello world", "completion": "one"},  # equal after whitespace cleaning
        {"prompt": "Hello world", "completion": "two"},
    ]
    prepared = _prepare(tmp_path, rows)
    assert _removed(prepared, "dedup") == {"exact_duplicate": 1}
    assert len(prepared.train) == 2
    assert _removed(_prepare(tmp_path / "off", rows, dedup={"exact": False}), "dedup") == {}


SENTENCE = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch and "
    "sips a cup of hot black coffee before the long day of work in the fields begins at dawn"
)


def test_near_duplicates_are_removed_with_minhash_and_distinct_rows_kept(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Summarise", "completion": SENTENCE},
        {"prompt": "Summarise", "completion": SENTENCE.replace("at dawn", "at six")},  # near copy
        {
            "prompt": "Summarise",
            "completion": "A completely different text about sailing boats on a calm lake.",
        },
        {"prompt": "Summarise", "completion": "Yet another unrelated sentence on the history of printing."},
    ]
    prepared = _prepare(tmp_path, rows, dedup={"near": True, "nearThreshold": 0.8})
    assert _removed(prepared, "dedup") == {"near_duplicate": 1}
    assert len(prepared.train) == 3
    kept = [make_tiny_tokenizer().decode(e["input_ids"]) for e in prepared.train]
    assert "at dawn" in kept[0]
    assert not any("at six" in text for text in kept)
    without = _prepare(tmp_path / "off", rows)
    assert _removed(without, "dedup") == {}


def test_shingles_of_short_texts() -> None:
    assert shingles("One two", 3) == {b"one two"}
    assert shingles("a b c d", 3) == {b"a b c", b"b c d"}
