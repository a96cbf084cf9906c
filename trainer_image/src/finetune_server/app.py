"""The FastAPI application: routers, API-key check, metrics. No argument parsing here."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from finetune_server.config import ServerConfig
from finetune_server.errors import UnauthorizedError, install_error_handlers
from finetune_server.metrics import ServerMetrics
from finetune_server.model import TextGenerationModel
from finetune_server.protocol import health, openai

#: Paths that never need a key: probes and metrics are scraped by the cluster, not by users.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


def read_api_keys(directory: Path) -> frozenset[str]:
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")]
    keys = frozenset(line.strip() for p in files for line in p.read_text().splitlines() if line.strip())
    if not keys:
        raise ValueError(f"auth.apiKeysDir {directory} holds no key")
    return keys


def create_app(
    config: ServerConfig, model: TextGenerationModel, metrics: ServerMetrics | None = None
) -> FastAPI:
    metrics = metrics or ServerMetrics()
    keys = read_api_keys(config.auth.api_keys_dir) if config.auth.mode == "api-keys" else frozenset()

    async def require_api_key(request: Request) -> None:
        """Every route but probes and metrics needs a Bearer key (when keys are configured); the refusal
        goes through the one error-to-status mapping in errors.py."""
        if not keys or request.url.path in OPEN_PATHS:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
            raise UnauthorizedError("missing or invalid API key")

    app = FastAPI(title="finetune-server", version="v1", dependencies=[Depends(require_api_key)])
    install_error_handlers(app)
    app.include_router(health.build_router(model))
    app.include_router(
        openai.build_router(model, config.limits.max_new_tokens, config.limits.default_max_new_tokens)
    )

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.url.path
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
