"""``POST /v1/predict`` for an object detector.

Request ``{"model": NAME, "inputs": ["<base64 image>", ...]}`` (at most ``limits.maxPredictInputs``; the
body at most ``limits.maxRequestBytes``); answer ``{"id", "model", "predictions": [{"boxes": [[x1, y1, x2,
y2], ...], "labels": [category, ...], "scores": [...]}, ...]}`` in input order, boxes in the input image's
pixels, highest score first. Each image is batched on its own, so the images of concurrent requests share
forward passes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from fastapi import APIRouter
from pydantic import BaseModel, Field

from finetune_server.batching import Batcher
from finetune_server.config import Limits
from finetune_server.models.detector import Detections, DetectorModel
from finetune_server.protocol.requests import check_request


class DetectRequest(BaseModel):
    model: str
    inputs: list[str] = Field(min_length=1, description="Images, base64-encoded (PNG, JPEG, ...).")


class DetectionsOut(BaseModel):
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]


class DetectResponse(BaseModel):
    id: str
    model: str
    predictions: list[DetectionsOut]


def build_router(
    model: DetectorModel, batcher: Batcher, limits: Limits, check_fault: Callable[[], None]
) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/predict")
    async def predict(req: DetectRequest) -> DetectResponse:
        check_fault()
        check_request(model.name, req.model, len(req.inputs), limits)
        images = [model.decode(data, i) for i, data in enumerate(req.inputs)]
        results: list[Detections] = await asyncio.gather(*(batcher.submit(image) for image in images))
        predictions = [DetectionsOut(boxes=r.boxes, labels=r.labels, scores=r.scores) for r in results]
        return DetectResponse(id=f"pred-{uuid.uuid4().hex}", model=model.name, predictions=predictions)

    return router
