"""``POST /v1/predict``: non-generative tasks (sequence classification now).

Request ``{"model": NAME, "inputs": ["text", ...]}`` (at most ``limits.maxPredictInputs``); answer
``{"model": NAME, "predictions": [{"label", "score", "scores": {label: probability}}, ...]}`` in input order.
Each input is batched on its own, so the inputs of concurrent requests share forward passes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from fastapi import APIRouter
from pydantic import BaseModel, Field

from finetune_server.batching import Batcher
from finetune_server.config import Limits
from finetune_server.models.classifier import ClassifierModel, Prediction
from finetune_server.protocol.requests import check_request


class PredictRequest(BaseModel):
    model: str
    inputs: list[str] = Field(min_length=1)


class PredictionOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class PredictResponse(BaseModel):
    id: str
    model: str
    predictions: list[PredictionOut]


def build_router(
    model: ClassifierModel, batcher: Batcher, limits: Limits, check_fault: Callable[[], None]
) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/predict")
    async def predict(req: PredictRequest) -> PredictResponse:
        check_fault()
        check_request(model.name, req.model, len(req.inputs), limits)
        encoded = [model.encode(text, i, limits.max_input_tokens) for i, text in enumerate(req.inputs)]
        results: list[Prediction] = await asyncio.gather(*(batcher.submit(ids) for ids in encoded))
        predictions = [PredictionOut(label=r.label, score=r.score, scores=r.scores) for r in results]
        return PredictResponse(id=f"pred-{uuid.uuid4().hex}", model=model.name, predictions=predictions)

    return router
