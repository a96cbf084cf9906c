"""The model object: load, ready, predict (KServe's shape). The only module that imports torch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from finetune_server.config import ServerConfig
from finetune_server.errors import InvalidInputError, ModelNotReadyError


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class TextGenerationModel:
    """A Hugging Face causal LM behind a lock: generate() is not re-entrant on one model copy."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = config.model_name
        self.ready = False
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype: Any = names.get(self.config.dtype, "auto")
        tokenizer = AutoTokenizer.from_pretrained(str(self.config.model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(self.config.model_dir), dtype=dtype)
        model.eval()  # type: ignore[no-untyped-call]
        if self.config.quantization.method == "int8-dynamic":
            model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                model, {torch.nn.Linear}, dtype=torch.qint8
            )
        self._model, self._tokenizer = model, tokenizer
        self.load_seconds = time.perf_counter() - started
        self.ready = True

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's own chat template when it has one, else a plain `role: content` transcript."""
        if getattr(self._tokenizer, "chat_template", None):
            rendered = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(rendered)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def generate(self, prompt: str, params: GenerationParams) -> Generation:
        if not self.ready:
            raise ModelNotReadyError(f"model {self.name} is still loading")
        if not prompt:
            raise InvalidInputError("prompt must not be empty", param="prompt")
        import torch

        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            encoded = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            input_ids = encoded["input_ids"]
            limit = getattr(self._model.config, "max_position_embeddings", None)
            if limit is not None and input_ids.shape[1] + params.max_new_tokens > limit:
                raise InvalidInputError(
                    f"prompt ({input_ids.shape[1]} tokens) + max_tokens ({params.max_new_tokens}) exceeds "
                    f"the model's context of {limit} tokens",
                    param="max_tokens",
                )
            sampling = params.temperature > 0
            output = self._model.generate(
                **encoded,
                max_new_tokens=params.max_new_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                pad_token_id=self._tokenizer.pad_token_id,
                eos_token_id=self._tokenizer.eos_token_id,
            )
        new_tokens = output[0, input_ids.shape[1] :]
        text = self._tokenizer.decode(new_tokens, skip_special_tokens=True)
        finish = "length" if len(new_tokens) >= params.max_new_tokens else "stop"
        for stop in params.stop:
            cut = text.find(stop)
            if cut != -1:
                text, finish = text[:cut], "stop"
        return Generation(text, int(input_ids.shape[1]), len(new_tokens), finish)
