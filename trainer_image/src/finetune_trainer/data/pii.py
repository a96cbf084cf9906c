"""Detection of personal data: emails, phone numbers, card numbers (Luhn-checked), IPv4/IPv6, extra patterns.

Hand-written on purpose (no maintained, dependency-light PII library fits a trainer image); every detector
is a regular expression for candidates plus a validator that rejects look-alikes:

- credit_card: 13-19 digits, optionally grouped by spaces or dashes, that pass the Luhn checksum.
- phone: grouped digits with an optional ``+country`` prefix and ``(area)``; 7-15 digits in all, and at least
  10 unless written with ``+`` or parentheses; ISO dates (2024-01-31) are not phones.
- ipv4: dotted quads with each octet 0-255; ipv6: validated by :mod:`ipaddress`, at least two hex groups.
- email: ``local@domain.tld``.

Detectors run in a fixed order (extra patterns, email, credit_card, ipv6, ipv4, phone) over the text with the
earlier matches already replaced, so one number is never counted twice (a card is not also a phone).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from finetune_trainer.data.config import PiiConfig

__all__ = ["PiiDetector", "PiiResult", "luhn_valid"]


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (card numbers)."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _is_card(match: str) -> bool:
    digits = _digits(match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


_ISO_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$")


def _is_phone(match: str) -> bool:
    digits = _digits(match)
    if not 7 <= len(digits) <= 15 or _ISO_DATE.match(match):
        return False
    return match.startswith("+") or "(" in match or len(digits) >= 10


def _is_ipv6(match: str) -> bool:
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return sum(1 for group in match.split(":") if group) >= 2


def _always(_: str) -> bool:
    return True


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_BUILTIN: dict[str, tuple[re.Pattern[str], Callable[[str], bool]]] = {
    "email": (
        re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        _always,
    ),
    "credit_card": (re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _is_card),
    "ipv6": (re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _is_ipv6),
    "ipv4": (re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)"), _always),
    "phone": (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])"
        ),
        _is_phone,
    ),
}
_ORDER = ("email", "credit_card", "ipv6", "ipv4", "phone")
_DIGIT = re.compile(r"\d")


_NO_ASCII_DIGITS = str.maketrans("", "", "0123456789")


def _digits_at_least(n: int) -> Callable[[str], bool]:
    def enough(text: str) -> bool:
        if text.isascii():
            return len(text) - len(text.translate(_NO_ASCII_DIGITS)) >= n
        return _DIGIT.search(text) is not None  # other scripts' digits: let the detector decide

    return enough


_FOUR_DIGITS = _digits_at_least(4)

#: What every match of a built-in detector contains (a card 13 digits, a phone 7, an IPv4 address 4 digits
#: and 3 dots, an IPv6 address 2 colons, an email an @): texts without it skip that detector — the same
#: result, far cheaper on the many rows without personal data.
_NEEDS: dict[str, Callable[[str], bool]] = {
    "email": lambda text: "@" in text,
    "credit_card": _digits_at_least(13),
    "ipv6": lambda text: text.count(":") >= 2,
    "ipv4": lambda text: text.count(".") >= 3 and _FOUR_DIGITS(text),
    "phone": _digits_at_least(7),
}


@dataclass
class PiiResult:
    """What one text contained, and the scrubbed text."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return bool(self.counts)


class PiiDetector:
    """Runs the configured detectors; ``scan(text)`` returns the scrubbed text and counts per kind."""

    def __init__(self, cfg: PiiConfig) -> None:
        self._detectors: list[tuple[str, re.Pattern[str], Callable[[str], bool], Callable[[str], bool]]] = [
            (extra.name, re.compile(extra.pattern), _always, _always) for extra in cfg.extra_patterns
        ]
        enabled = set(cfg.kinds)
        self._detectors += [(kind, *_BUILTIN[kind], _NEEDS[kind]) for kind in _ORDER if kind in enabled]

    @property
    def kinds(self) -> list[str]:
        return [name for name, _, _, _ in self._detectors]

    def scan(self, text: str) -> PiiResult:
        counts: dict[str, int] = {}
        for name, pattern, valid, needs in self._detectors:
            if not needs(text):
                continue
            token = f"[{name.upper()}]"

            def replace(
                match: re.Match[str],
                name: str = name,
                token: str = token,
                valid: Callable[[str], bool] = valid,
            ) -> str:
                if not match.group(0) or not valid(match.group(0)):
                    return match.group(0)
                counts[name] = counts.get(name, 0) + 1
                return token

            text = pattern.sub(replace, text)
        return PiiResult(text, counts)

    def scan_all(self, texts: Iterable[str]) -> tuple[list[str], dict[str, int]]:
        """Scan several texts (the fields of one row); counts are summed."""
        scrubbed: list[str] = []
        counts: dict[str, int] = {}
        for text in texts:
            result = self.scan(text)
            scrubbed.append(result.text)
            for kind, n in result.counts.items():
                counts[kind] = counts.get(kind, 0) + n
        return scrubbed, counts
