"""The canary analysis' reads: the server pods' own `/metrics` (and readiness answer), or a Prometheus.

The one I/O layer of `finetune_operator.rollout`: it fetches, `rollout.samples` parses. A read that fails
(timeout, refused connection, non-200, malformed text) is a missing reading, never a zero: the analysis is
then inconclusive for that pod or that interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp

from finetune_operator.rollout.samples import (
    API_PREFIX,
    LATENCY_HISTOGRAMS,
    REQUEST_COUNTERS,
    PodCounters,
    ServingSample,
    parse_pod_metrics,
)

logger = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 2.0


async def _get(
    session: aiohttp.ClientSession, url: str, *, accept_statuses: tuple[int, ...] = (200,)
) -> str | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_SECONDS)) as response:
            if response.status not in accept_statuses:
                logger.debug("GET %s: HTTP %s", url, response.status)
                return None
            return await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.debug("GET %s: %s", url, exc)
        return None


async def read_pod_counters(session: aiohttp.ClientSession, base_url: str) -> PodCounters | None:
    """One pod's API request counters from `base_url/metrics`; None when they can't be read."""
    text = await _get(session, f"{base_url}/metrics")
    if text is None:
        return None
    try:
        return parse_pod_metrics(text)
    except ValueError as exc:
        logger.warning("%s/metrics is not Prometheus text: %s", base_url, exc)
        return None


async def read_sample(session: aiohttp.ClientSession, pods: Mapping[str, str]) -> ServingSample:
    """The counters of several pods (name -> base URL), read concurrently; unreadable pods are left out."""
    names = list(pods)
    readings = await asyncio.gather(*(read_pod_counters(session, pods[name]) for name in names))
    return ServingSample({name: counters for name, counters in zip(names, readings, strict=True) if counters})


async def _get_json(
    session: aiohttp.ClientSession, url: str, *, accept_statuses: tuple[int, ...] = (200,)
) -> dict[str, Any] | None:
    text = await _get(session, url, accept_statuses=accept_statuses)
    try:
        body = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def read_readiness(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any] | None:
    """The server's readiness answer (`/v2/health/ready`: phase, reason, message, quality, sizes), ready
    or not (it answers 503 with the same body until the model passed its gate)."""
    return await _get_json(session, f"{base_url}/v2/health/ready", accept_statuses=(200, 503))


def _promql_selector(namespace: str, pod_regex: str) -> str:
    return f'namespace="{namespace}",pod=~"{pod_regex}",route=~"{API_PREFIX}.*"'


async def _query(session: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]] | None:
    body = await _get_json(session, f"{url.rstrip('/')}/api/v1/query?{urlencode({'query': promql})}")
    if body is None or body.get("status") != "success":
        return None
    result = body.get("data", {}).get("result")
    return result if isinstance(result, list) else None


def _value(result: Iterable[dict[str, Any]]) -> float:
    return sum(float(item["value"][1]) for item in result)


async def query_prometheus(
    session: aiohttp.ClientSession, url: str, *, namespace: str, pod_regex: str, window_seconds: int
) -> PodCounters | None:
    """The same counts over the last `window_seconds` from a Prometheus scraping the pods (the builtin
    server's names; `increase()` handles restarts as the pod readings do)."""
    selector = _promql_selector(namespace, pod_regex)
    window = f"[{max(window_seconds, 1)}s]"
    counter, histogram = REQUEST_COUNTERS[1], LATENCY_HISTOGRAMS[1]
    requests = await _query(session, url, f"sum(increase({counter}{{{selector}}}{window}))")
    errors = await _query(session, url, f'sum(increase({counter}{{{selector},code=~"5.."}}{window}))')
    buckets = await _query(session, url, f"sum by (le) (increase({histogram}_bucket{{{selector}}}{window}))")
    if requests is None or errors is None or buckets is None:
        return None
    bounds = sorted((float(item["metric"]["le"]), float(item["value"][1])) for item in buckets)
    return PodCounters(_value(requests), _value(errors), tuple(bounds))
