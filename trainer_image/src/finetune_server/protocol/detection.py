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
from finetune_server.errors import ModelNotFoundError, PayloadTooLargeError
from finetune_server.models.detector import Detections, DetectorModel


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
        if req.model != model.name:
            raise ModelNotFoundError(
                f"model: {req.model!r} is not served here; this server serves {model.name!r}", param="model"
            )
        if len(req.inputs) > limits.max_predict_inputs:
            raise PayloadTooLargeError(
                f"inputs: {len(req.inputs)} inputs is above this server's limit of "
                f"{limits.max_predict_inputs} (limits.maxPredictInputs)",
                param="inputs",
            )
        images = [model.decode(data, i) for i, data in enumerate(req.inputs)]
        results: list[Detections] = await asyncio.gather(*(batcher.submit(image) for image in images))
        predictions = [DetectionsOut(boxes=r.boxes, labels=r.labels, scores=r.scores) for r in results]
        return DetectResponse(id=f"pred-{uuid.uuid4().hex}", model=model.name, predictions=predictions)

    return router
