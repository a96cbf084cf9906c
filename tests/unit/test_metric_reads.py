"""The analysis' reads over real HTTP: a local aiohttp server plays the server pods and a Prometheus."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from finetune_operator.metric_reads import query_prometheus, read_readiness, read_sample

EXPOSITION = """\
# TYPE fto_server_requests_total counter
fto_server_requests_total{route="/v1/chat/completions",code="200"} 30.0
fto_server_requests_total{route="/v1/chat/completions",code="500"} 3.0
# TYPE fto_server_request_duration_seconds histogram
fto_server_request_duration_seconds_bucket{route="/v1/chat/completions",le="0.5"} 33.0
fto_server_request_duration_seconds_bucket{route="/v1/chat/completions",le="+Inf"} 33.0
fto_server_request_duration_seconds_count{route="/v1/chat/completions"} 33.0
fto_server_request_duration_seconds_sum{route="/v1/chat/completions"} 3.0
"""


async def _serve(app: web.Application, body: Callable[[str], Awaitable[Any]]) -> Any:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_pods_are_read_and_an_unreachable_or_broken_one_is_missing_not_zero() -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=EXPOSITION)

    async def garbage(_: web.Request) -> web.Response:
        return web.Response(text='fto_server_requests_total{code="200" 1\n')

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"phase": "QualityGateFailed", "quality": {"drop": 0.4}}, status=503)

    app = web.Application()
    app.router.add_get("/good/metrics", metrics)
    app.router.add_get("/bad/metrics", garbage)
    app.router.add_get("/good/v2/health/ready", ready)

    async def body(base: str) -> None:
        async with aiohttp.ClientSession() as session:
            sample = await read_sample(
                session, {"a": f"{base}/good", "b": f"{base}/bad", "c": "http://127.0.0.1:9/none"}
            )
            assert set(sample.pods) == {"a"}
            assert (sample.pods["a"].requests, sample.pods["a"].errors) == (33, 3)
            health = await read_readiness(session, f"{base}/good")
            assert health == {"phase": "QualityGateFailed", "quality": {"drop": 0.4}}, (
                "503 still carries the body"
            )

    asyncio.run(_serve(app, body))


def test_prometheus_window_is_read_through_increase_queries() -> None:
    queries: list[str] = []

    async def query(request: web.Request) -> web.Response:
        promql = request.query["query"]
        queries.append(promql)
        if "by (le)" in promql:
            result = [
                {"metric": {"le": "0.5"}, "value": [0, "18"]},
                {"metric": {"le": "+Inf"}, "value": [0, "20"]},
            ]
        elif 'code=~"5.."' in promql:
            result = [{"metric": {}, "value": [0, "2"]}]
        else:
            result = [{"metric": {}, "value": [0, "20"]}]
        return web.Response(text=json.dumps({"status": "success", "data": {"result": result}}))

    app = web.Application()
    app.router.add_get("/api/v1/query", query)

    async def body(base: str) -> None:
        async with aiohttp.ClientSession() as session:
            got = await query_prometheus(
                session, base, namespace="ns", pod_regex="bot-canary-.*", window_seconds=60
            )
            assert got is not None
            assert (got.requests, got.errors) == (20, 2)
            assert got.latency_buckets == ((0.5, 18.0), (float("inf"), 20.0))

    asyncio.run(_serve(app, body))
    assert all('namespace="ns",pod=~"bot-canary-.*"' in q and "[60s]" in q for q in queries)
