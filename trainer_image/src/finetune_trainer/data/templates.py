"""Render a record as text with the character spans that carry the loss.

A rendering is a list of segments ``(text, trainable)``; concatenated they are the training text, and the
trainable ones (completion, output, assistant turns with their end-of-turn marker) become the loss spans.
Templates:

- plain: ``prompt\\ncompletion``; instruction rows ``instruction\\n\\ninput\\noutput``; chat rows
  ``role: content`` lines.
- alpaca: the Stanford Alpaca prompt (with or without ``### Input:``), response after ``### Response:``.
- chatml: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn.
- tokenizer: ``tokenizer.apply_chat_template``; each assistant turn's span is found by rendering the
  conversation up to that turn (with the generation prompt) and up to its end.

Rows of kind text and classification are their text, whatever the template (a classification pair is its
two texts around the tokenizer's separator token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.mapping import Message, Record

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "Rendered", "record_messages", "render"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Rendered:
    text: str
    #: Character ranges [start, end) of ``text`` that carry the loss.
    spans: tuple[tuple[int, int], ...]
    #: Everything before the last trainable segment: what a model is given to generate the completion.
    prompt_text: str
    #: Whether the template already ends the example (chat templates' end-of-turn); EOS is not appended then.
    self_terminated: bool = False


def _from_segments(segments: list[tuple[str, bool]], *, self_terminated: bool = False) -> Rendered:
    text, spans, position, prompt_end = [], [], 0, 0
    for chunk, trainable in segments:
        if trainable and chunk:
            spans.append((position, position + len(chunk)))
            prompt_end = position
        text.append(chunk)
        position += len(chunk)
    full = "".join(text)
    return Rendered(full, tuple(spans), full[:prompt_end], self_terminated)


def record_messages(record: Record, system_prompt: str | None) -> list[Message]:
    """The record as chat turns (prompt-completion and instruction rows become one user/assistant pair)."""
    if record.kind == "chat":
        messages = list(record.messages)
    elif record.kind == "prompt-completion":
        messages = [Message("user", record.parts["prompt"]), Message("assistant", record.parts["completion"])]
    elif record.kind == "instruction":
        user = record.parts["instruction"]
        if record.parts["input"]:
            user += "\n\n" + record.parts["input"]
        messages = [Message("user", user), Message("assistant", record.parts["output"])]
    else:
        raise ValueError(f"rows of kind {record.kind!r} have no chat form")
    if system_prompt and messages[0].role != "system":
        messages.insert(0, Message("system", system_prompt))
    return messages


def _plain(record: Record, cfg: DataConfig) -> list[tuple[str, bool]]:
    if record.kind == "prompt-completion":
        return [(record.parts["prompt"] + "\n", False), (record.parts["completion"], True)]
    if record.kind == "instruction":
        prompt = record.parts["instruction"]
        if record.parts["input"]:
            prompt += "\n\n" + record.parts["input"]
        return [(prompt + "\n", False), (record.parts["output"], True)]
    segments: list[tuple[str, bool]] = []
    for message in record_messages(record, cfg.system_prompt):
        if message.role == "assistant":
            segments += [("assistant: ", False), (message.content, True), ("\n", False)]
        else:
            segments.append((f"{message.role}: {message.content}\n", False))
    if segments and segments[-1] == ("\n", False):
        segments.pop()
    return segments


def _alpaca(record: Record) -> list[tuple[str, bool]]:
    if record.kind == "prompt-completion":
        instruction, context, output = record.parts["prompt"], "", record.parts["completion"]
    else:
        instruction, context, output = (
            record.parts["instruction"],
            record.parts["input"],
            record.parts["output"],
        )
    template = ALPACA_PROMPT_WITH_INPUT if context else ALPACA_PROMPT
    prompt = template.replace("{instruction}", instruction).replace("{input}", context)
    return [(prompt, False), (output, True)]


def _chatml(record: Record, cfg: DataConfig) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for message in record_messages(record, cfg.system_prompt):
        if message.role == "assistant":
            segments += [(f"{IM_START}assistant\n", False), (message.content + IM_END, True), ("\n", False)]
        else:
            segments.append((f"{IM_START}{message.role}\n{message.content}{IM_END}\n", False))
    if segments and segments[-1] == ("\n", False):
        segments.pop()  # the example ends at the last <|im_end|> (then EOS)
    return segments


def _chat_template(record: Record, cfg: DataConfig, tokenizer: Any) -> Rendered:
    messages = [{"role": m.role, "content": m.content} for m in record_messages(record, cfg.system_prompt)]

    def render(upto: int, *, generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)

    full = render(len(messages), generation_prompt=False)
    spans: list[tuple[int, int]] = []
    prompt_end = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(index, generation_prompt=True) if index else ""
        through = render(index + 1, generation_prompt=False)
        if full.startswith(through) and through.startswith(before) and len(through) > len(before):
            start, end = len(before), len(through)
        else:  # a template that is not prefix-stable: find the content itself after the previous span
            start = full.find(message["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise ValueError("the tokenizer's chat template drops or rewrites assistant messages")
            end = start + len(message["content"])
        # Trailing newlines after the end-of-turn marker are layout, not something to learn.
        while end > start and full[end - 1] in "\n ":
            end -= 1
        spans.append((start, end))
        prompt_end = start
    return Rendered(full, tuple(spans), full[:prompt_end], self_terminated=True)


def pair_text(text: str, pair: str, tokenizer: Any) -> str:
    """A classification pair as one text: the two texts around the tokenizer's separator token (``[SEP]``,
    ``</s>``: the tokenizer turns it back into that special token), or a newline when it has none. A client
    of the served model sends a pair joined the same way."""
    sep = getattr(tokenizer, "sep_token", None) or getattr(tokenizer, "eos_token", None)
    return f"{text} {sep} {pair}" if sep else f"{text}\n{pair}"


def render(record: Record, cfg: DataConfig, tokenizer: Any = None) -> Rendered:
    """The training text of a record under ``cfg.template``."""
    if record.kind == "classification" and "text_pair" in record.parts:
        return _from_segments([(pair_text(record.parts["text"], record.parts["text_pair"], tokenizer), True)])
    if record.kind in ("text", "classification"):
        return _from_segments([(record.parts["text"], True)])
    if cfg.template == "plain":
        return _from_segments(_plain(record, cfg))
    if cfg.template == "alpaca":
        return _from_segments(_alpaca(record))
    if cfg.template == "chatml":
        return _from_segments(_chatml(record, cfg), self_terminated=False)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat template")
    return _chat_template(record, cfg, tokenizer)
