"""Liveness and readiness: plain probes for Kubernetes and KServe's v2 health endpoints.

Readiness answers 503 until the model is loaded and its compression passed the quality gate; the body says
why (``phase``, ``reason``, ``message``) and carries the measured figures (``quality``, ``sizeBytes``), which
is where the operator reads them for the ModelDeployment's status.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from finetune_server.errors import ModelNotFoundError
from finetune_server.models.base import LoadedModel


def build_router(model: LoadedModel) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/readyz")
    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse(model.health(), status_code=200 if model.ready else 503)

    @router.get("/v2/models/{name}")
    async def metadata(name: str) -> dict[str, Any]:
        if name != model.name:
            raise ModelNotFoundError(f"model {name!r} is not served here", param="name")
        return model.health()

    @router.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        if name != model.name:
            raise ModelNotFoundError(f"model {name!r} is not served here", param="name")
        return JSONResponse(model.health(), status_code=200 if model.ready else 503)

    return router
