"""Liveness and readiness: plain probes for Kubernetes and KServe's v2 health endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from finetune_server.errors import ModelNotFoundError, ModelNotReadyError
from finetune_server.model import TextGenerationModel


def build_router(model: TextGenerationModel) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/readyz")
    @router.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        if not model.ready:
            raise ModelNotReadyError(f"model {model.name} is still loading")
        return {"ready": True}

    @router.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict[str, object]:
        if name != model.name:
            raise ModelNotFoundError(f"model {name!r} is not served here")
        if not model.ready:
            raise ModelNotReadyError(f"model {model.name} is still loading")
        return {"name": name, "ready": True}

    return router
