"""OpenAI-compatible REST: /v1/models, /v1/completions, /v1/chat/completions (JSON or server-sent events).

``/v1/completions`` sends ``prompt`` to the model as is; ``/v1/chat/completions`` renders ``messages`` with
the template the model was trained with (``TextGenerationModel.render_chat``). The response ``id`` is the
request id ``/v1/feedback`` refers to.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from finetune_server.batching import Batcher
from finetune_server.config import Limits
from finetune_server.errors import InvalidInputError, ModelNotFoundError, ServerError, error_body
from finetune_server.feedback import FeedbackStore
from finetune_server.metrics import ServerMetrics
from finetune_server.models.text_generation import Generation, GenerationParams, Piece, TextGenerationModel


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


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


def _finish(reason: str) -> str:
    return "length" if reason == "cancelled" else reason


@dataclass
class Services:
    model: TextGenerationModel
    batcher: Batcher
    limits: Limits
    metrics: ServerMetrics
    feedback: FeedbackStore | None
    check_fault: Callable[[], None]


def build_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/v1")
    model, limits, metrics = services.model, services.limits, services.metrics

    def params(req: _Sampling) -> GenerationParams:
        if req.model != model.name:
            raise ModelNotFoundError(
                f"model: {req.model!r} is not served here; this server serves {model.name!r}", param="model"
            )
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        wanted = req.max_completion_tokens or req.max_tokens or limits.default_max_new_tokens
        if wanted > limits.max_new_tokens:
            raise InvalidInputError(
                f"{field}: {wanted} is above this server's limit of {limits.max_new_tokens} "
                "(limits.maxNewTokens)",
                param=field,
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if any(not s for s in stop):
            raise InvalidInputError("stop: stop strings must not be empty", param="stop")
        return GenerationParams(wanted, req.temperature, req.top_p, stop, req.seed)

    def observe(gen: Generation, started: float) -> None:
        name = model.name
        metrics.prompt_tokens.labels(name).inc(gen.prompt_tokens)
        metrics.generation_tokens.labels(name).inc(gen.completion_tokens)
        metrics.e2e.labels(name).observe(gen.finished_at - started)
        metrics.success.labels(name, _finish(gen.finish_reason)).inc()
        if gen.first_token_at is not None:
            metrics.ttft.labels(name).observe(gen.first_token_at - started)
            if gen.completion_tokens > 1:
                metrics.tpot.labels(name).observe(
                    (gen.finished_at - gen.first_token_at) / (gen.completion_tokens - 1)
                )

    def record(
        request_id: str, gen: Generation, prompt: str | None, messages: list[dict[str, str]] | None
    ) -> None:
        if services.feedback is not None:
            services.feedback.record_request(
                request_id, model.name, gen.text, prompt=prompt, messages=messages
            )

    async def run(
        request_id: str,
        prompt: str,
        req: _Sampling,
        chunk: Callable[[str, str | None], dict[str, Any]],
        respond: Callable[[Generation], dict[str, Any]],
        messages: list[dict[str, str]] | None = None,
    ) -> Any:
        started = time.monotonic()
        services.check_fault()
        p = params(req)
        encoded = model.encode(prompt, p, limits.max_input_tokens)
        raw_prompt = None if messages is not None else prompt
        if not req.stream:
            gen: Generation = await services.batcher.submit(encoded)
            observe(gen, started)
            record(request_id, gen, raw_prompt, messages)
            return respond(gen)

        queue: asyncio.Queue[Piece | None] = asyncio.Queue()
        work = services.batcher.admit(encoded, queue.put_nowait)
        work.future.add_done_callback(lambda _: queue.put_nowait(None))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    piece = await queue.get()
                    if piece is None:
                        break
                    finish = _finish(piece.finish_reason) if piece.finish_reason else None
                    yield f"data: {json.dumps(chunk(piece.text, finish))}\n\n"
                gen = await services.batcher.wait(work)
                observe(gen, started)
                record(request_id, gen, raw_prompt, messages)
                if include_usage:
                    usage = {**chunk("", None), "choices": [], "usage": _usage(gen)}
                    yield f"data: {json.dumps(usage)}\n\n"
            except ServerError as exc:
                yield f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.param))}\n\n"
            finally:
                if not work.future.done():
                    services.batcher.cancel(work)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.get("/models")
    async def list_models() -> dict[str, object]:
        entry = {"id": model.name, "object": "model", "owned_by": "finetune-operator", "created": 0}
        return {"object": "list", "data": [entry]}

    @router.post("/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        request.state.request_id = request_id

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model.name,
                "choices": [choice],
            }

        def respond(gen: Generation) -> dict[str, Any]:
            return {**chunk(gen.text, _finish(gen.finish_reason)), "usage": _usage(gen)}

        return await run(request_id, req.prompt, req, chunk, respond)

    @router.post("/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> Any:
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        request.state.request_id = request_id
        model.require_ready()
        messages = [m.model_dump() for m in req.messages]
        prompt = model.render_chat(messages)
        first = [True]

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.name,
                "choices": [choice],
            }

        def respond(gen: Generation) -> dict[str, Any]:
            message = {"role": "assistant", "content": gen.text}
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": _finish(gen.finish_reason),
                "logprobs": None,
            }
            return {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": model.name,
                "choices": [choice],
                "usage": _usage(gen),
            }

        return await run(request_id, prompt, req, chunk, respond, messages)

    return router
