"""The Arrow paths give exactly what the per-row code gives: vectorised encoding, the PII and whitespace fast
paths, the examples read by index, the fingerprint."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_trainer.data.cleaning import _collapse_whitespace
from finetune_trainer.data.config import DataConfig, PiiConfig
from finetune_trainer.data.encoding import IGNORE_INDEX, encode_batch, encode_columns
from finetune_trainer.data.pii import _BUILTIN, _ORDER, PiiDetector
from finetune_trainer.data.pipeline import prepare
from finetune_trainer.data.store import ExampleView, memory_mapped_table
from finetune_trainer.data.templates import Rendered
from finetune_trainer.tasks.causal_lm import CausalLM
from tiny_tokenizer import make_tiny_tokenizer

TOKENIZER = make_tiny_tokenizer()
TEXT = st.text(alphabet=string.ascii_letters + " \n:.", min_size=0, max_size=40)


@st.composite
def rendered(draw: st.DrawFn) -> Rendered:
    pieces = draw(st.lists(st.tuples(TEXT, st.booleans()), min_size=1, max_size=4))
    text, spans, position = "", [], 0
    for chunk, trainable in pieces:
        if trainable and chunk:
            spans.append((position, position + len(chunk)))
        text += chunk
        position += len(chunk)
    return Rendered(text, tuple(spans), "", self_terminated=draw(st.booleans()))


def _as_examples(columns: object, n: int) -> list[object]:
    out = []
    for row in range(n):
        if columns.dropped[row]:  # type: ignore[attr-defined]
            out.append(columns.dropped[row])  # type: ignore[attr-defined]
            continue
        ids = columns.ids[columns.offsets[row] : columns.offsets[row + 1]].tolist()  # type: ignore[attr-defined]
        labels = columns.labels[columns.label_offsets[row] : columns.label_offsets[row + 1]].tolist()  # type: ignore[attr-defined]
        out.append((ids, labels, columns.truncated[row]))  # type: ignore[attr-defined]
    return out


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(rendered(), min_size=1, max_size=6),
    max_length=st.integers(min_value=1, max_value=30),
    truncation=st.sampled_from(["truncate", "drop"]),
    completion_only=st.booleans(),
    add_eos=st.booleans(),
    add_special=st.booleans(),
)
def test_vectorised_encoding_equals_the_per_row_encoding(
    batch: list[Rendered],
    max_length: int,
    truncation: str,
    completion_only: bool,
    add_eos: bool,
    add_special: bool,
) -> None:
    options = {
        "max_length": max_length,
        "truncation": truncation,
        "completion_only": completion_only,
        "add_eos": add_eos,
        "add_special_tokens": add_special,
    }
    expected = []
    for result in encode_batch(batch, TOKENIZER, **options):
        if result.dropped or result.example is None:
            expected.append(result.dropped)
        else:
            expected.append((result.example["input_ids"], result.example["labels"], result.truncated))
    columns = encode_columns(batch, TOKENIZER, **options)
    assert _as_examples(columns, len(batch)) == expected
    assert columns.loss_tokens == [
        sum(t != IGNORE_INDEX for t in e[1]) if isinstance(e, tuple) else 0 for e in expected
    ]


PII_TEXT = st.text(alphabet="0123456789 .-:@+()abcxyz\n", max_size=60)


@settings(max_examples=400, deadline=None)
@given(text=PII_TEXT)
def test_pii_prefilters_never_change_a_result(text: str) -> None:
    detector = PiiDetector(PiiConfig())
    scanned = detector.scan(text)
    # The same detectors without their prefilters: every regular expression on every text.
    counts: dict[str, int] = {}
    plain = text
    for name in _ORDER:
        pattern, valid = _BUILTIN[name]

        def replace(match: object, name: str = name, valid: object = valid) -> str:
            found = match.group(0)  # type: ignore[attr-defined]
            if not found or not valid(found):  # type: ignore[operator]
                return found  # type: ignore[no-any-return]
            counts[name] = counts.get(name, 0) + 1
            return f"[{name.upper()}]"

        plain = pattern.sub(replace, plain)
    assert (scanned.text, scanned.counts) == (plain, counts)


def _collapse_slow(text: str) -> str:
    """The whitespace rule without the fast path."""
    import re

    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    joined = "\n".join(re.sub(r"[^\S\n]+", " ", line).strip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", joined).strip()


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab \t\n\r\x0b\xa0", max_size=30))
def test_whitespace_fast_path_never_changes_a_result(text: str) -> None:
    assert _collapse_whitespace(text) == _collapse_slow(text)


def test_examples_read_by_index_slice_and_fingerprint_like_a_list(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(300)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig.model_validate({"source": str(tmp_path / "d.jsonl"), "maxSeqLength": 24})
    prepared = prepare(cfg, TOKENIZER, tmp_path / "work")
    as_list = list(prepared.train)
    assert len(as_list) == len(prepared.train) == prepared.report.splits["train"].rows
    assert prepared.train[3] == as_list[3]
    assert prepared.train[-1] == as_list[-1]
    assert prepared.train[5:9] == as_list[5:9]
    assert all(isinstance(t, int) for t in as_list[0]["input_ids"] + as_list[0]["labels"])
    assert as_list[0]["attention_mask"] == [1] * len(as_list[0]["input_ids"])
    assert prepared.train.fingerprint() == CausalLM.fingerprint(as_list)  # type: ignore[attr-defined]
    with pytest.raises(IndexError):
        prepared.train[len(prepared.train)]
    packed = prepare(cfg.model_copy(update={"packing": True}), TOKENIZER, tmp_path / "packed")
    assert packed.train.fingerprint() == CausalLM.fingerprint(list(packed.train))  # type: ignore[attr-defined]
    assert sum(len(e["input_ids"]) for e in packed.train) == sum(len(e["input_ids"]) for e in as_list)


def _stream_file(path: Path, ids: list[list[int]]) -> Path:
    table = pa.table(
        {"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(ids, pa.list_(pa.int32()))}
    )
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    return path


def test_examples_read_from_the_mapped_file_equal_those_of_the_table_in_memory(tmp_path: Path) -> None:
    """The view reads values with pread from the file its table maps; an in-memory table is sliced. Both give
    the same examples, and a view keeps reading its own file after the path is replaced by a new one."""
    rng = random.Random(3)
    ids = [[rng.randrange(1000) for _ in range(rng.randint(1, 30))] for _ in range(100)]
    path = _stream_file(tmp_path / "examples.arrow", ids)
    rows = np.arange(100)[::-1]
    mapped = ExampleView(memory_mapped_table(str(path)), rows)
    in_memory = ExampleView(pa.ipc.open_stream(path.read_bytes()).read_all(), rows)
    assert mapped.files() == {str(path)}
    assert in_memory.files() == {None}
    expected = [{"input_ids": i, "attention_mask": [1] * len(i), "labels": i} for i in ids[::-1]]
    assert list(mapped) == list(in_memory) == expected
    assert mapped[10:20] == expected[10:20]
    replacement = _stream_file(tmp_path / "new.arrow", [[7] * len(i) for i in ids])
    replacement.rename(path)
    assert mapped[0]["input_ids"] == ids[-1]
    assert ExampleView(memory_mapped_table(str(path)), rows)[0]["input_ids"] == [7] * len(ids[-1])


def _varied_rows(path: Path, rows: int) -> Path:
    """Prompt/completion rows with something for every stage: malformed lines, empty completions, e-mail
    addresses, exact copies of rows far earlier (in another process's share), long rows to truncate."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quick", "brown", "lazy", "fox"]
    lines = []
    for i in range(rows):
        if i % 150 == 7:
            lines.append("{broken")
            continue
        if i % 50 == 3 and i >= 1000:
            lines.append(lines[i - 1000] if lines[i - 1000] != "{broken" else lines[i - 1001])
            continue
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        completion = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        if i % 90 == 13:
            completion = ""
        if i % 40 == 11:
            completion += f" mail user{i}@example.com"
        lines.append(json.dumps({"prompt": f"Q{i}: {prompt}?", "completion": completion}))
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"augmentation": {"strategy": "template-variants"}}, id="augmented"),
        pytest.param({"packing": True}, id="packed"),
        # MinHash signatures are computed in the map, the LSH index after it; ~15 s in one process here.
        pytest.param({"dedup": {"near": True}}, id="near-dedup", marks=pytest.mark.slow),
    ],
)
def test_several_processes_prepare_exactly_what_one_process_prepares(
    tmp_path: Path, options: dict[str, object]
) -> None:
    source = _varied_rows(tmp_path / "d.jsonl", 2400)
    # a test split too (not the default), so that every split is compared
    split = {"validation": 0.05, "test": 0.05}
    cfg = DataConfig.model_validate({"source": str(source), "maxSeqLength": 48, "split": split, **options})
    one = prepare(cfg, TOKENIZER, tmp_path / "one", num_proc=1)
    # 2400 rows read and 2300-4400 encoded: each map splits its rows into three shares of 500 or more.
    several = prepare(cfg, TOKENIZER, tmp_path / "several", num_proc=3, rows_per_process=500)
    assert one.folder is not None
    assert several.folder is not None
    assert len(list(one.folder.glob("examples*.arrow"))) == 1
    assert len(list(several.folder.glob("examples*.arrow"))) == 3  # the work really was split

    for split in ("train", "validation", "test"):
        assert list(getattr(several, split)) == list(getattr(one, split)), split
    assert several.train.fingerprint() == one.train.fingerprint()  # type: ignore[attr-defined]
    assert several.samples == one.samples
    assert several.label_names == one.label_names

    def report(workdir: Path) -> dict[str, object]:
        written = json.loads((workdir / "data_report.json").read_text())
        written["cache"].pop("folder")  # each preparation has its own temporary folder
        return written  # type: ignore[no-any-return]

    assert report(tmp_path / "several") == report(tmp_path / "one")
    # Every stage had work to do, so the comparison covers it.
    removed = {s.name: s.removed for s in one.report.stages}
    assert removed["read"] == {"malformed": 16}
    assert removed["clean"] == {"empty": 26}
    assert removed["dedup"]["exact_duplicate"] == 25
    assert one.report.pii.matches["email"] > 0
    assert min(one.report.splits[name].rows for name in ("validation", "test")) > 0
    assert one.report.splits["train"].truncated > 0
