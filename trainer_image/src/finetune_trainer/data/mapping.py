"""Map a raw row onto a typed record, or say precisely why it can't be (missing field, wrong type)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_trainer.data.config import FieldMapping

__all__ = ["ROLES", "MappingError", "Message", "Record", "map_row"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One example, independent of its source format.

    ``parts`` holds the named text fields of the row layout (prompt/completion; instruction/input/output;
    text, and text_pair for a classification pair); ``messages`` holds chat turns; ``label`` the class of
    a classification row.
    """

    source: str
    line: int
    kind: str
    parts: dict[str, str] = field(default_factory=dict)
    messages: tuple[Message, ...] = ()
    label: str | None = None
    row_id: str | None = None

    def texts(self) -> list[str]:
        return [*self.parts.values(), *(m.content for m in self.messages)]

    def map_texts(self, fn: Callable[[str], str]) -> Record:
        """The same record with ``fn`` applied to every text field."""
        return Record(
            self.source,
            self.line,
            self.kind,
            parts={name: fn(value) for name, value in self.parts.items()},
            messages=tuple(Message(m.role, fn(m.content)) for m in self.messages),
            label=self.label,
            row_id=self.row_id,
        )

    def target_text(self) -> str:
        """The text the model learns to produce: completion, output, last assistant turn, or the text."""
        if self.kind == "prompt-completion":
            return self.parts["completion"]
        if self.kind == "instruction":
            return self.parts["output"]
        if self.kind == "chat":
            return next((m.content for m in reversed(self.messages) if m.role == "assistant"), "")
        return self.parts["text"]

    def content(self) -> str:
        """Canonical JSON of the mapped content: the key of exact de-duplication and of the split hash."""
        return json.dumps(
            [self.kind, self.parts, [[m.role, m.content] for m in self.messages], self.label],
            ensure_ascii=False,
            sort_keys=True,
            separators=(",", ":"),
        )

    def content_digest(self) -> str:
        return hashlib.sha256(self.content().encode()).hexdigest()

    def split_key(self, content_digest: str | None = None) -> str:
        """The stable identity of the row: its id column when configured, else its content (pass
        ``content_digest`` when it is already known)."""
        if self.row_id is not None:
            return f"id:{self.row_id}"
        return f"content:{content_digest or self.content_digest()}"

    def dumps(self) -> str:
        """Compact JSON of everything but source and line (kept beside it): how stages pass records on."""
        return json.dumps(
            [self.kind, self.parts, [[m.role, m.content] for m in self.messages], self.label, self.row_id],
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str, *, source: str = "", line: int = 0) -> Record:
        """The record :meth:`dumps` wrote."""
        kind, parts, messages, label, row_id = json.loads(text)
        return cls(
            source,
            line,
            kind,
            parts=parts,
            messages=tuple(Message(role, content) for role, content in messages),
            label=label,
            row_id=row_id,
        )


class MappingError(ValueError):
    """A row does not fit the configured layout; the message becomes its bad-row reason."""


def _text(row: dict[str, Any], column: str, *, required: bool = True) -> str:
    if column not in row or row[column] is None:
        if required:
            raise MappingError(f"missing field {column!r}")
        return ""
    value = row[column]
    if not isinstance(value, str):
        raise MappingError(f"field {column!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], column: str) -> tuple[Message, ...]:
    if column not in row or row[column] is None:
        raise MappingError(f"missing field {column!r}")
    value = row[column]
    if isinstance(value, str):  # CSV cells and some parquet files hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise MappingError(f"field {column!r} is a string but not a JSON list: {exc}") from exc
    if not isinstance(value, list) or not value:
        raise MappingError(f"field {column!r} must be a non-empty list of messages")
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise MappingError(f"{column}[{index}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise MappingError(f"{column}[{index}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise MappingError(f"{column}[{index}].content must be a string, got {type(content).__name__}")
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise MappingError(f"field {column!r} has no assistant message to learn from")
    return tuple(messages)


def _key(row: dict[str, Any], column: str, what: str = "field") -> str:
    """A label or id: a string or an integer (booleans are refused), as a string."""
    if column not in row or row[column] is None:
        raise MappingError(f"missing {what} {column!r}")
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"{what} {column!r} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def map_row(row: dict[str, Any], mapping: FieldMapping, *, source: str, line: int) -> Record:
    """Build a :class:`Record`; raises :class:`MappingError` naming the field that is missing or mistyped."""
    kind = mapping.kind
    row_id = _key(row, mapping.id, "id field") if mapping.id is not None else None
    if kind == "prompt-completion":
        parts = {"prompt": _text(row, mapping.prompt), "completion": _text(row, mapping.completion)}
        return Record(source, line, kind, parts=parts, row_id=row_id)
    if kind == "instruction":
        parts = {
            "instruction": _text(row, mapping.instruction),
            "input": _text(row, mapping.input, required=False),
            "output": _text(row, mapping.output),
        }
        return Record(source, line, kind, parts=parts, row_id=row_id)
    if kind == "chat":
        return Record(source, line, kind, messages=_messages(row, mapping.messages), row_id=row_id)
    if kind == "text":
        return Record(source, line, kind, parts={"text": _text(row, mapping.text)}, row_id=row_id)
    parts = {"text": _text(row, mapping.text)}
    if mapping.text_pair is not None:  # a mapped pair column is read from every row
        parts["text_pair"] = _text(row, mapping.text_pair)
    return Record(source, line, kind, parts=parts, label=_key(row, mapping.label), row_id=row_id)
