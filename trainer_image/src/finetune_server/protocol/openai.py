"""OpenAI-compatible REST: /v1/models, /v1/completions, /v1/chat/completions (non-streaming)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from finetune_server.errors import InvalidInputError, ModelNotFoundError
from finetune_server.model import Generation, GenerationParams, TextGenerationModel


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False


class CompletionRequest(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def build_router(model: TextGenerationModel, max_new_tokens: int, default_max_new_tokens: int) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def params(req: _Sampling) -> GenerationParams:
        if req.model != model.name:
            raise ModelNotFoundError(
                f"model {req.model!r} is not served here; this server serves {model.name!r}", param="model"
            )
        wanted = req.max_tokens or default_max_new_tokens
        if wanted > max_new_tokens:
            raise InvalidInputError(
                f"max_tokens: {wanted} is above this server's limit of {max_new_tokens}", param="max_tokens"
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return GenerationParams(wanted, req.temperature, req.top_p, stop, req.seed)

    async def run(prompt: str, p: GenerationParams, request: Request) -> Generation:
        gen = await anyio.to_thread.run_sync(model.generate, prompt, p)
        request.state.completion_tokens = gen.completion_tokens
        return gen

    @router.get("/models")
    async def list_models() -> dict[str, object]:
        entry = {"id": model.name, "object": "model", "owned_by": "finetune-operator"}
        return {"object": "list", "data": [entry]}

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> dict[str, object]:
        gen = await run(req.prompt, params(req), request)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [{"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}],
            "usage": _usage(gen),
        }

    @router.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> dict[str, object]:
        prompt = model.render_chat([m.model_dump() for m in req.messages])
        gen = await run(prompt, params(req), request)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": _usage(gen),
        }

    return router
