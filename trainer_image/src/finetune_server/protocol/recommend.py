"""``POST /v1/recommend``: the top-k items for each of a few users (task ``recommendation``).

Request ``{"model": NAME, "users": ["u1", ...], "k": 10, "excludeSeen": true}`` (at most
``limits.maxPredictInputs`` users; ``k`` defaults to the job's ``evaluation.topK``); answer
``{"model": NAME, "recommendations": [{"user", "items": [{"item", "score"}, ...]}, ...]}`` in request order. A
user the model was not trained with is a 400 naming ``users[i]``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_server.batching import Batcher
from finetune_server.config import Limits
from finetune_server.models.recommender import Recommendation, RecommenderModel
from finetune_server.protocol.requests import check_request


class RecommendRequest(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    model: str
    users: list[str] = Field(min_length=1)
    k: int | None = Field(default=None, ge=1, le=1000)
    exclude_seen: bool = True


class ScoredItem(BaseModel):
    item: str
    score: float


class UserRecommendations(BaseModel):
    user: str
    items: list[ScoredItem]


class RecommendResponse(BaseModel):
    id: str
    model: str
    recommendations: list[UserRecommendations]


def build_router(
    model: RecommenderModel, batcher: Batcher, limits: Limits, check_fault: Callable[[], None]
) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/recommend")
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        check_fault()
        check_request(model.name, req.model, len(req.users), limits, field="users")
        model.require_ready()
        results: list[list[Recommendation]] = await asyncio.gather(
            *(batcher.submit((user, req.k, req.exclude_seen, i)) for i, user in enumerate(req.users))
        )
        answers = [
            UserRecommendations(user=user, items=[ScoredItem(item=r.item, score=r.score) for r in found])
            for user, found in zip(req.users, results, strict=True)
        ]
        return RecommendResponse(id=f"rec-{uuid.uuid4().hex}", model=model.name, recommendations=answers)

    return router
