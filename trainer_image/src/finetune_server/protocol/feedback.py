"""``POST /v1/feedback``: a rating (``up``/``down``) and an optional correction of an answer, by its id."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from finetune_server.config import Feedback
from finetune_server.errors import PayloadTooLargeError
from finetune_server.feedback import FeedbackStore


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    rating: Literal["up", "down"]
    correction: str | None = Field(None, min_length=1)


def build_router(store: FeedbackStore, config: Feedback) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/feedback", status_code=201)
    async def feedback(req: FeedbackRequest) -> dict[str, str]:
        if req.correction is not None and len(req.correction) > config.max_correction_chars:
            raise PayloadTooLargeError(
                f"correction: {len(req.correction)} characters is above the limit of "
                f"{config.max_correction_chars} "
                "(feedback.maxCorrectionChars)",
                param="correction",
            )
        store.record_feedback(req.request_id, req.rating, req.correction)
        return {"status": "recorded", "request_id": req.request_id}

    return router
