"""Text generation (task ``causal-lm``): batched incremental decoding with per-request sampling and stops.

A batch of requests is left-padded and decoded together, one token per step for every request still going
(KV cache on torch backends). Each request keeps its own ``max_tokens``, temperature, top-p, seed and stop
strings; a request that finishes, is cancelled or passes its deadline stops being extended (its row is fed
padding until the batch ends). Streamed text is held back by the longest stop string, so a stop string is
never sent.

Chat requests are rendered with the template the job trained with (``finetune_trainer.data.templates``,
from the artifact's serving.json): for ``plain`` and prompt-completion rows, one user message ``m`` becomes
``m + "\\n"``, exactly what training put before the completion. ``/v1/completions`` sends its prompt as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune_server.errors import InvalidInputError, PayloadTooLargeError
from finetune_server.models.base import LoadedModel


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: GenerationParams


@dataclass(frozen=True)
class Piece:
    """A streamed piece of text; the last one of a request carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", or "cancelled"
    first_token_at: float | None = None
    finished_at: float = field(default_factory=time.monotonic)


class _Row:
    def __init__(self, work: Any, tokenizer: Any, generator: Any) -> None:
        self.work = work
        self.request: GenerationRequest = work.payload
        self.tokenizer = tokenizer
        self.generator = generator
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        self.first_token_at: float | None = None
        self.holdback = max((len(s) for s in self.request.params.stop), default=1) - 1

    def add(self, token: int, eos_ids: set[int]) -> None:
        params = self.request.params
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            for stop in params.stop:
                cut = self.text.find(stop)
                if cut != -1:
                    self.text, self.finish = self.text[:cut], "stop"
            if self.finish is None and len(self.tokens) >= params.max_new_tokens:
                self.finish = "length"
        if self.finish is None and self.work.expired:
            self.finish = "cancelled"
        end = len(self.text) if self.finish else max(self.sent, len(self.text) - self.holdback)
        if end > self.sent or self.finish:
            self.work.emit(Piece(self.text[self.sent : end], self.finish))
            self.sent = end


class TextGenerationModel(LoadedModel):
    task: ClassVar[str] = "causal-lm"
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    causal: ClassVar[bool] = True

    def on_loaded(self) -> None:
        from finetune_server.backends import RecomputeDecoder, TorchBackend

        self.decoder: Any = (
            self.backend if isinstance(self.backend, TorchBackend) else RecomputeDecoder(self.backend)
        )
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        config = getattr(getattr(self.backend, "module", None), "config", None)
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------------ prompts
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt training put before a completion, for this conversation (see the module docstring)."""
        from finetune_trainer.data.config import DataConfig
        from finetune_trainer.data.mapping import Message, Record
        from finetune_trainer.data.templates import render

        artifact = self.artifact
        assert artifact is not None
        template = artifact.template or (
            "tokenizer" if getattr(self.tokenizer, "chat_template", None) else None
        )
        if template is None:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join([*lines, "assistant: "])
        kind = artifact.row_kind or "chat"
        marker = "\x00"  # a placeholder completion: the rendered prompt is everything before it
        if kind in ("prompt-completion", "instruction"):
            turns = [m for m in messages if m["role"] != "system"]
            if len(turns) != 1 or turns[0]["role"] != "user":
                raise InvalidInputError(
                    f"messages: this model was trained on single-turn {kind} rows; send one user message",
                    param="messages",
                )
            record = Record(
                "request", 0, "prompt-completion", parts={"prompt": turns[0]["content"], "completion": marker}
            )
        else:
            chat = (*(Message(m["role"], m["content"]) for m in messages), Message("assistant", marker))
            record = Record("request", 0, "chat", messages=chat)
        cfg = DataConfig(
            source="request", template=template, system_prompt=artifact.system_prompt, fields={"kind": kind}
        )
        return render(record, cfg, self.tokenizer).prompt_text

    def encode(self, prompt: str, params: GenerationParams, max_input_tokens: int) -> GenerationRequest:
        self.require_ready()
        if not prompt:
            raise InvalidInputError("prompt: must not be empty", param="prompt")
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if len(ids) > max_input_tokens:
            raise PayloadTooLargeError(
                f"prompt: {len(ids)} tokens is above this server's limit of {max_input_tokens} "
                "(limits.maxInputTokens)",
                param="prompt",
            )
        if self.context_length is not None and len(ids) + params.max_new_tokens > self.context_length:
            raise InvalidInputError(
                f"max_tokens: the prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) "
                "exceeds the "
                f"model's context of {self.context_length} tokens",
                param="max_tokens",
            )
        return GenerationRequest(ids, params)

    # ------------------------------------------------------------------------------------------- decode
    def run_batch(self, batch: list[Any]) -> None:
        import torch

        pad = int(self.tokenizer.pad_token_id)
        generators = []
        for work in batch:
            seed = work.payload.params.seed
            generators.append(torch.Generator().manual_seed(seed) if seed is not None else None)
        rows = [_Row(w, self.tokenizer, g) for w, g in zip(batch, generators, strict=True)]
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.request.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.request.prompt_ids)
            mask[i, width - n :] = 1
        steps = max(r.request.params.max_new_tokens for r in rows)
        with self.lock, torch.inference_mode():
            logits, state = self.decoder.start(ids, mask)
            for step in range(steps):
                chosen = [
                    self._choose(logits[i], row) if row.finish is None else pad for i, row in enumerate(rows)
                ]
                for token, row in zip(chosen, rows, strict=True):
                    if row.finish is None:
                        row.add(token, self.eos_ids)
                if all(r.finish for r in rows) or step == steps - 1:
                    break
                logits, state = self.decoder.step(torch.tensor(chosen, dtype=torch.long), state)
        for row in rows:
            row.work.finish(
                Generation(
                    text=row.text,
                    prompt_tokens=len(row.request.prompt_ids),
                    completion_tokens=len(row.tokens),
                    finish_reason=row.finish or "length",
                    first_token_at=row.first_token_at,
                )
            )

    @staticmethod
    def _choose(logits: Any, row: _Row) -> int:
        import torch

        params = row.request.params
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))


class DirectWork:
    """A work item for calling the model without the batcher (benchmarks, tools): no loop, no deadline."""

    expired = False

    def __init__(self, payload: GenerationRequest) -> None:
        self.payload = payload
        self.result: Generation | None = None

    def emit(self, piece: Piece) -> None:
        del piece

    def finish(self, result: Generation) -> None:
        self.result = result


def generate_directly(model: TextGenerationModel, request: GenerationRequest) -> Generation:
    """One generation through the model's decode loop, in this thread, with no queue or batcher around it."""
    work = DirectWork(request)
    model.run_batch([work])
    assert work.result is not None
    return work.result
