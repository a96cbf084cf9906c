"""PII detectors (cards with Luhn, phones, emails, IPs, extra patterns) and the scrub/reject/allow policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.data.config import DataConfig, PiiConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.pii import PiiDetector, luhn_valid
from finetune_trainer.data.pipeline import PreparedData, prepare
from tiny_tokenizer import make_tiny_tokenizer

# Published test numbers of the card networks (valid Luhn) and the same numbers with the last digit changed.
VALID_CARDS = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"]
INVALID_CARDS = ["4111111111111112", "5555555555554445", "378282246310006", "6011111111111118"]


@pytest.mark.parametrize("number", VALID_CARDS)
def test_luhn_accepts_valid_card_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", INVALID_CARDS)
def test_luhn_rejects_a_changed_digit(number: str) -> None:
    assert not luhn_valid(number)


def _scan(text: str, **cfg: Any) -> tuple[str, dict[str, int]]:
    result = PiiDetector(PiiConfig.model_validate(cfg)).scan(text)
    return result.text, result.counts


def test_card_numbers_are_found_only_when_the_checksum_holds() -> None:
    assert _scan("pay with 4111 1111 1111 1111 today") == ("pay with [CREDIT_CARD] today", {"credit_card": 1})
    assert _scan("pay with 4111-1111-1111-1111") == ("pay with [CREDIT_CARD]", {"credit_card": 1})
    assert _scan("order 4111 1111 1111 1112 shipped") == ("order 4111 1111 1111 1112 shipped", {})


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("write to jane.doe+ml@example.co.uk please", "write to [EMAIL] please", {"email": 1}),
        ("call +1 (555) 123-4567 now", "call [PHONE] now", {"phone": 1}),
        ("call 555-123-4567 now", "call [PHONE] now", {"phone": 1}),
        ("ring +44 20 7946 0958", "ring [PHONE]", {"phone": 1}),
        ("server 192.168.10.1 down", "server [IPV4] down", {"ipv4": 1}),
        ("v6 2001:db8::8a2e:370:7334 and fe80::1", "v6 [IPV6] and [IPV6]", {"ipv6": 2}),
    ],
)
def test_builtin_detectors(text: str, expected: str, counts: dict[str, int]) -> None:
    assert _scan(text) == (expected, counts)


@pytest.mark.parametrize(
    "text",
    [
        "released on 2024-01-31",
        "version 1.2.3 of the library",
        "not an address 10.0.0.256",
        "std::vector<int> and 12:30:45",
        "pi is 3.14159 and e is 2.71828",
        "room 101, floor 3",
    ],
)
def test_look_alikes_are_not_pii(text: str) -> None:
    assert _scan(text) == (text, {})


def test_extra_patterns_and_kind_selection() -> None:
    text = "badge EMP-004211 mail a@b.io"
    assert _scan(text, extraPatterns=[{"name": "employee_id", "pattern": r"EMP-\d{6}"}], kinds=[]) == (
        "badge [EMPLOYEE_ID] mail a@b.io",
        {"employee_id": 1},
    )


ROWS = [
    {"prompt": "Who do I contact?", "completion": "Write to help@example.com or call 555-123-4567."},
    {"prompt": "Card on file?", "completion": "Yes, 4111 1111 1111 1111."},
    {"prompt": "Fake card?", "completion": "The number 4111 1111 1111 1112 is not valid."},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"prompt": "Two plus two?", "completion": "Four."},
]


def _prepare(tmp_path: Path, pii: dict[str, Any]) -> PreparedData:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = DataConfig.model_validate({"source": str(path), "split": {"validation": 0, "test": 0}, "pii": pii})
    return prepare(cfg, make_tiny_tokenizer(), tmp_path / "work")


def _texts(prepared: PreparedData) -> list[str]:
    tokenizer = make_tiny_tokenizer()
    return [tokenizer.decode(e["input_ids"]) for e in prepared.train]


def test_scrub_replaces_pii_and_counts_per_kind(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, {"policy": "scrub"})
    texts = _texts(prepared)
    assert len(texts) == 5
    joined = "\n".join(texts)
    assert "help@example.com" not in joined
    assert "555-123-4567" not in joined
    assert "4111 1111 1111 1111" not in joined
    assert "[EMAIL]" in texts[0]
    assert "[PHONE]" in texts[0]
    assert "[CREDIT_CARD]" in texts[1]
    assert "4111 1111 1111 1112" in texts[2]  # fails the Luhn check: kept
    pii = prepared.report.pii
    assert pii.matches == {"email": 1, "phone": 1, "credit_card": 1}
    assert pii.rows_with_pii == 2
    assert pii.rows_rejected == 0


def test_reject_drops_rows_with_pii_and_counts_them(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, {"policy": "reject"})
    texts = _texts(prepared)
    assert len(texts) == 3
    assert not any("@" in t or "[EMAIL]" in t for t in texts)
    assert prepared.report.pii.rows_rejected == 2
    pii_stage = next(s for s in prepared.report.stages if s.name == "pii")
    assert pii_stage.removed == {"pii": 2}


def test_reject_above_the_limit_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, {"policy": "reject", "maxRejectRatio": 0.2})
    assert info.value.reason == "TooMuchPersonalData"
    assert "2 of 5 rows" in str(info.value)


def test_allow_keeps_the_text_and_still_counts(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, {"policy": "allow"})
    texts = _texts(prepared)
    assert "help@example.com" in texts[0]
    assert prepared.report.pii.matches == {"email": 1, "phone": 1, "credit_card": 1}
