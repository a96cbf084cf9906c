"""The FastAPI application: routers, API-key check, metrics. No argument parsing here."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from finetune_server.config import ServerConfig
from finetune_server.errors import UnauthorizedError, error_body, install_error_handlers
from finetune_server.metrics import ServerMetrics
from finetune_server.model import TextGenerationModel
from finetune_server.protocol import health, openai

#: Paths that never need a key: probes and metrics are scraped by the cluster, not by users.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


def read_api_keys(path: Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    keys = frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not keys:
        raise ValueError(f"apiKeysFile {path} holds no key")
    return keys


def create_app(
    config: ServerConfig, model: TextGenerationModel, metrics: ServerMetrics | None = None
) -> FastAPI:
    metrics = metrics or ServerMetrics()
    keys = read_api_keys(config.api_keys_file)
    app = FastAPI(title="finetune-server", version="v1")
    install_error_handlers(app)
    app.include_router(health.build_router(model))
    app.include_router(openai.build_router(model, config.max_new_tokens, config.default_max_new_tokens))

    def authorized(request: Request) -> bool:
        if not keys or request.url.path in OPEN_PATHS:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, k) for k in keys)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        route = request.url.path
        if not authorized(request):
            response: Response = JSONResponse(
                error_body("missing or invalid API key", UnauthorizedError.error_type, None),
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        tokens = getattr(request.state, "completion_tokens", 0)
        if tokens:
            metrics.completion_tokens.inc(tokens)
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.model_ready.set(1 if model.ready else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
