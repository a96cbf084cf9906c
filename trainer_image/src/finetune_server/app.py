"""The FastAPI application: routers for the model's task, API keys, request limits, metrics.

No argument parsing and no model loading here (``__main__`` starts the load in the background, so liveness
answers at once and readiness turns true when the weights are in and the gate passed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from finetune_server.auth import KeyRing
from finetune_server.batching import Batcher
from finetune_server.config import ServerConfig
from finetune_server.errors import InjectedFaultError, UnauthorizedError, error_body, install_error_handlers
from finetune_server.feedback import FeedbackStore
from finetune_server.metrics import ServerMetrics
from finetune_server.models.base import LoadedModel
from finetune_server.models.classifier import ClassifierModel
from finetune_server.models.detector import DetectorModel
from finetune_server.models.recommender import RecommenderModel
from finetune_server.models.text_generation import TextGenerationModel
from finetune_server.protocol import detection, feedback, health, openai, predict, recommend

#: Paths that never need a key: probes and metrics are scraped by the cluster, not by users.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


def create_app(config: ServerConfig, model: LoadedModel, metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    keyring = KeyRing(config.auth) if config.auth.mode == "api-keys" else None
    limits = config.limits
    batcher = Batcher(
        model.run_batch,  # type: ignore[attr-defined]
        max_batch_size=config.batching.max_batch_size,
        max_wait_s=config.batching.max_wait_ms / 1000,
        max_queued=limits.max_queued_requests,
        timeout_s=limits.request_timeout_seconds,
        name=f"batcher-{model.name}",
    )

    async def require_api_key(request: Request) -> None:
        """Every route but probes and metrics needs a Bearer key; refusals go through errors.py."""
        if keyring is None or request.url.path in OPEN_PATHS:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not keyring.accepts(token.strip()):
            raise UnauthorizedError("missing or invalid API key")

    def check_fault() -> None:
        if config.faults.error_rate and random.random() < config.faults.error_rate:
            raise InjectedFaultError("injected fault (faults.errorRate)")

    app = FastAPI(title="finetune-server", version="v1", dependencies=[Depends(require_api_key)])
    app.state.batcher = batcher
    install_error_handlers(app)
    app.include_router(health.build_router(model))
    store = FeedbackStore(config.feedback.dir) if config.feedback.enabled else None
    if isinstance(model, TextGenerationModel):
        services = openai.Services(model, batcher, limits, metrics, store, check_fault)
        app.include_router(openai.build_router(services))
    elif isinstance(model, ClassifierModel):
        app.include_router(predict.build_router(model, batcher, limits, check_fault))
    elif isinstance(model, RecommenderModel):
        app.include_router(recommend.build_router(model, batcher, limits, check_fault))
    elif isinstance(model, DetectorModel):
        app.include_router(detection.build_router(model, batcher, limits, check_fault))
    if store is not None:
        app.include_router(feedback.build_router(store, config.feedback))

    @app.middleware("http")
    async def limit_and_observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        too_large = length is not None and length.isdigit() and int(length) > limits.max_request_bytes
        if not too_large and length is None and request.method == "POST":
            too_large = len(await request.body()) > limits.max_request_bytes
        if too_large:
            message = (
                f"body: the request is larger than this server's limit of {limits.max_request_bytes} bytes"
            )
            response: Response = JSONResponse(error_body(message, "invalid_request_error", "body"), 413)
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", request.url.path)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics")
    async def prometheus() -> Response:
        _refresh_gauges(metrics, model, batcher)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _refresh_gauges(metrics: ServerMetrics, model: LoadedModel, batcher: Batcher) -> None:
    metrics.model_ready.set(1 if model.ready else 0)
    metrics.running.labels(model.name).set(batcher.running)
    metrics.waiting.labels(model.name).set(batcher.waiting)
    status = model.status
    for result in status.results:
        metrics.gate_passed.labels(result.step).set(1 if result.passed else 0)
        metrics.quality_drop.labels(result.step, result.metric).set(result.quality_drop)
        metrics.quality_metric.labels("baseline", result.metric).set(result.baseline)
        metrics.quality_metric.labels(result.step, result.metric).set(result.value)
    if status.original_size_bytes is not None:
        metrics.size_bytes.labels("original").set(status.original_size_bytes)
    if status.size_bytes is not None:
        metrics.size_bytes.labels("served").set(status.size_bytes)
