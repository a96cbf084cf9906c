"""Text normalisation (NFKC, whitespace, HTML) and the length filters.

HTML stripping uses the standard library's ``html.parser`` (a tolerant tokenizer that is part of CPython), not
regular expressions; text inside ``<script>`` and ``<style>`` is dropped and block-level tags become newlines.
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

from finetune_trainer.data.config import CleaningConfig
from finetune_trainer.data.mapping import Record

__all__ = ["clean_record", "clean_text", "length_violation", "strip_html"]

_BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "td",
        "th",
        "tr",
        "ul",
    ]
)
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template"})
_TAG_HINT = re.compile(r"<[A-Za-z!/][^>]*>|&[#A-Za-z0-9]+;")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
#: What _collapse_whitespace changes: whitespace other than a single inner space (a text without any of it
#: is returned as it is, which is most texts).
_COLLAPSIBLE = re.compile(r"[^\S ]|  |^ | $")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.chunks.append(data)


def strip_html(text: str) -> str:
    """Visible text of an HTML fragment; plain text without tags or entities is returned unchanged."""
    if not _TAG_HINT.search(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return html.unescape("".join(parser.chunks))


def _collapse_whitespace(text: str) -> str:
    if not _COLLAPSIBLE.search(text):
        return text
    lines = [
        _SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    ]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_text(text: str, cfg: CleaningConfig) -> str:
    if cfg.normalize_unicode:
        text = unicodedata.normalize("NFKC", text)
    if cfg.strip_html:
        text = strip_html(text)
    if cfg.collapse_whitespace:
        text = _collapse_whitespace(text)
    return text


def clean_record(record: Record, cfg: CleaningConfig) -> Record:
    return record.map_texts(lambda text: clean_text(text, cfg))


def length_violation(record: Record, cfg: CleaningConfig) -> str | None:
    """``"empty"`` / ``"too_short"`` / ``"too_long"`` when the record fails a length filter, else None."""
    target = record.target_text().strip()
    if not target:
        return "empty"
    if len(target) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and sum(len(t) for t in record.texts()) > cfg.max_chars:
        return "too_long"
    return None
