"""The one place that talks to the Kubernetes API.

A small asyncio client on aiohttp (already kopf's transport), authenticated with the same
`kopf.ConnectionInfo` that kopf logs in with, so the operator imports no `kubernetes` client
(≈60 % of a kopf operator's memory, per kopf's own measurement) and never blocks the event loop.

Policy: children are written with server-side apply (field manager `finetune-operator`, force);
a 404 on get/delete/patch means "gone" and returns None/False; a 409 on apply can't happen with
force, and a 409 on delete (a precondition) is raised; 429/5xx/connection errors are retried a few
times with backoff before `ApiError` escapes (kopf then retries the handler).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from finetune_operator.api import finetunejob, modeldeployment
from finetune_operator.api.common import API_VERSION
from finetune_operator.timestamps import now_rfc3339

FIELD_MANAGER = "finetune-operator"
logger = logging.getLogger(__name__)

Obj = dict[str, Any]

_PLURALS: dict[tuple[str, str], str] = {
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"): "validatingwebhookconfigurations",
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): "mutatingwebhookconfigurations",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("v1", "Node"): "nodes",
    ("v1", "Namespace"): "namespaces",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("storage.k8s.io/v1", "StorageClass"): "storageclasses",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "localqueues",
    (API_VERSION, finetunejob.KIND): finetunejob.PLURAL,
    (API_VERSION, modeldeployment.KIND): modeldeployment.PLURAL,
}
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_CLUSTER_SCOPED = frozenset(
    {"Node", "Namespace", "StorageClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)


class ApiError(Exception):
    """A non-retryable or exhausted API failure."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}")


def resource_path(
    api_version: str,
    kind: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    plural = _PLURALS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace and kind not in _CLUSTER_SCOPED:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """Async API access; create it inside the running loop (`from_connection_info`), `close()` at exit."""

    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self._session = session
        self._server = server.rstrip("/")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The authenticated session, for reads through the API server's proxy (`pod_proxy_url`)."""
        return self._session

    def pod_proxy_url(self, namespace: str, pod: str, port: int) -> str:
        """Base URL of `pod`'s `port` through the API server (`pods/proxy`, RBAC `get` on it): how a client
        outside the pod network reaches a pod's HTTP endpoints."""
        return f"{self._server}{resource_path('v1', 'Pod', namespace, f'{pod}:{port}', 'proxy')}"

    @classmethod
    def from_connection_info(cls, info: Any, *, timeout_seconds: float = 60.0, pool: int = 64) -> KubeClient:
        """Build from a `kopf.ConnectionInfo` (what `kopf.login_with_kubeconfig()` & co. return)."""
        ssl_context: Any = False if info.insecure else info.as_ssl_context()
        connector = aiohttp.TCPConnector(ssl=ssl_context, limit=pool)
        session = aiohttp.ClientSession(
            connector=connector,
            headers=info.as_http_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            trust_env=bool(info.trust_env),
        )
        return cls(session, info.server)

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Obj:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        for attempt, delay in enumerate((*_RETRY_DELAYS, None)):
            try:
                async with self._session.request(
                    method, self._server + path, params=params, data=data, headers=headers
                ) as response:
                    payload = await response.read()
                    if response.status < 400:
                        return json.loads(payload) if payload else {}
                    status_body = _json_or_empty(payload)
                    error = ApiError(
                        response.status,
                        str(status_body.get("reason") or response.reason),
                        str(status_body.get("message") or payload[:300]),
                    )
                    if response.status not in _RETRY_STATUSES or delay is None:
                        raise error
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if delay is None:
                    raise ApiError(0, "ConnectionError", str(exc)) from exc
                logger.debug("retrying %s %s after %r (try %d)", method, path, exc, attempt + 1)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def apply(self, manifest: Mapping[str, Any], *, subresource: str | None = None) -> Obj:
        """Server-side apply `manifest` (a full intent object) as our field manager, taking over conflicts."""
        meta = manifest["metadata"]
        path = resource_path(
            manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"], subresource
        )
        return await self.request(
            "PATCH",
            path,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=manifest,
            content_type="application/apply-patch+yaml",
        )

    async def create(self, manifest: Mapping[str, Any]) -> Obj | None:
        """Create; None if an object of that name exists already (409). For kinds that must not be
        re-applied once they exist, such as Jobs, whose pod template is immutable."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        try:
            return await self.request("POST", path, params={"fieldManager": FIELD_MANAGER}, body=manifest)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        params: dict[str, str] = {"limit": "500"}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        items: list[Obj] = []
        while True:
            page = await self.request("GET", resource_path(api_version, kind, namespace), params=params)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params["continue"] = token

    async def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        resource_version: str | None = None,
        timeout_seconds: int = 600,
        metadata_only: bool = False,
    ) -> AsyncIterator[Obj]:
        """Watch events (`{"type": ..., "object": ...}`) after `resource_version` (default: from now on)
        until the server closes the stream, which it may do at any time (e.g. when a CRD changes).
        `metadata_only` asks for PartialObjectMetadata (no spec, data or status), as controller-runtime's
        metadata-only watches do: far less to encode, send and parse."""
        params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        headers = {"Accept": METADATA_ONLY} if metadata_only else {}
        if label_selector:
            params["labelSelector"] = label_selector
        if resource_version:
            params["resourceVersion"] = resource_version
        url = self._server + resource_path(api_version, kind, namespace)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        async with self._session.get(url, params=params, timeout=timeout, headers=headers) as response:
            if response.status >= 400:
                raise ApiError(response.status, str(response.reason), (await response.read())[:300].decode())
            # Objects can exceed aiohttp's line limit (managed fields, kopf's diff-base): split ourselves.
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    async def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str = "Background",
        grace_period_seconds: int | None = None,
    ) -> bool:
        """Delete; False if it was already gone (404). A 409 (failed precondition) is raised."""
        options: Obj = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        try:
            await self.request("DELETE", resource_path(api_version, kind, namespace, name), body=options)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str, status: Mapping[str, Any]
    ) -> Obj | None:
        """JSON merge patch of `.status` only: fields not named (the trainer's progress) are kept."""
        try:
            return await self.request(
                "PATCH",
                resource_path(api_version, kind, namespace, name, "status"),
                params={"fieldManager": FIELD_MANAGER},
                body={"status": status},
                content_type="application/merge-patch+json",
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def post_event(self, involved: Mapping[str, Any], *, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved` (best effort: failures are logged, never raised)."""
        meta = involved["metadata"]
        stamp = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.request("POST", resource_path("v1", "Event", meta["namespace"]), body=event)
        except ApiError as exc:
            logger.warning("could not post event %s on %s: %s", reason, meta["name"], exc)


def _json_or_empty(payload: bytes) -> Obj:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
