"""Live reporting from rank 0: FineTuneJob status patches, Prometheus metrics and a JSON-lines log.

Status patches go through the Kubernetes API with the pod's ServiceAccount (or a kubeconfig named by
``FTO_STATUS_KUBECONFIG`` outside a pod) from a background thread: at most one patch every
``reporting.statusThrottleSeconds``, newest values win, and API errors are logged, never raised — a
training run must not die because the API server is slow or the Role is wrong. A merge patch of status is
idempotent, so one that failed on the way (a dropped or stalled connection, 429, 5xx) is sent again: the last
one carries the artifact.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from finetune_trainer.config import Reporting
from finetune_trainer.env import STATUS_KUBECONFIG_ENV, in_cluster

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
#: Tries of one status patch, and the seconds one waits for an answer (what a stalled connection costs).
PATCH_ATTEMPTS, PATCH_TIMEOUT_SECONDS = 3, 30.0
#: API answers worth another try; any other (403, 404, 422) would be refused again.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
#: Field manager of the trainer's status patches (`kubectl get ftj -o yaml --show-managed-fields`).
FIELD_MANAGER = "finetune-trainer"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_client(environ: dict[str, str] | None = None) -> Any | None:
    """A CustomObjectsApi when in a cluster (or given a kubeconfig), else None."""
    env = dict(os.environ) if environ is None else environ
    from kubernetes import client, config

    kubeconfig = env.get(STATUS_KUBECONFIG_ENV)
    if kubeconfig:
        api_client = config.new_client_from_config(config_file=kubeconfig)
        return client.CustomObjectsApi(api_client)
    if in_cluster(env):
        config.load_incluster_config()
        return client.CustomObjectsApi()
    return None


def retryable(exc: BaseException) -> bool:
    """Whether a failed patch may pass on another try: the API server's answer says so, or there was none (the
    connection dropped, stalled or was refused)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return exc.status in RETRYABLE_STATUS
    return True


def failure_reason(exc: BaseException) -> str:
    """The API server's own message for a refused patch (which field, which rule), else the error."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return f"{exc.status} {exc.reason}: {message or exc.body or ''}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class StatusPatcher:
    """Merge-patches ``status`` of one FineTuneJob from a daemon thread, throttled, errors swallowed."""

    def __init__(self, api: Any, name: str, namespace: str, throttle_seconds: float):
        self.api, self.name, self.namespace = api, name, namespace
        self.throttle = throttle_seconds
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        #: Held from taking the pending status to the end of its patch (its tries included): patches go out
        #: one at a time, in the order they were taken, and close() waits for one in flight.
        self._sending = threading.Lock()
        self._stopped = False
        self.patches_sent = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="status-patcher", daemon=True)
        self._thread.start()

    def submit(self, status: dict[str, Any]) -> None:
        with self._lock:
            for key, value in status.items():
                current = self._pending.get(key)
                if isinstance(current, dict) and isinstance(value, dict):
                    current.update(value)
                else:
                    self._pending[key] = dict(value) if isinstance(value, dict) else value
        self._wake.set()

    def _take(self) -> dict[str, Any]:
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    def _send(self, status: dict[str, Any]) -> None:
        for attempt in range(1, PATCH_ATTEMPTS + 1):
            try:
                self.api.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    {"status": status},
                    field_manager=FIELD_MANAGER,
                    _request_timeout=PATCH_TIMEOUT_SECONDS,
                )
                self.patches_sent += 1
                return
            except Exception as exc:  # any API failure: log and keep training
                again = attempt < PATCH_ATTEMPTS and retryable(exc)
                log.warning(
                    "status patch of %s/%s failed (attempt %d of %d%s): %s",
                    self.namespace,
                    self.name,
                    attempt,
                    PATCH_ATTEMPTS,
                    ", trying again" if again else "",
                    failure_reason(exc),
                )
                if not again:
                    self.errors += 1
                    return
                time.sleep(attempt)

    def _send_pending(self) -> bool:
        """Send what is pending, if anything; whether there was."""
        with self._sending:
            status = self._take()
            if status:
                self._send(status)
            return bool(status)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            if self._send_pending():
                time.sleep(self.throttle)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending now (bypassing the throttle) and stop the thread. A patch in flight (being
        tried again) is waited for first, so an older status never lands after the last one."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=min(timeout, max(self.throttle, 0.1) + 1))
        self._send_pending()


class PrometheusMetrics:
    def __init__(self, port: int):
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"finetune_trainer_{name}", doc, registry=self.registry)

        self.gauges = {
            "loss": gauge("loss", "Training loss (mean over the logging interval)."),
            "eval_loss": gauge("eval_loss", "Latest validation loss."),
            "learning_rate": gauge("learning_rate", "Current learning rate."),
            "grad_norm": gauge("grad_norm", "Global gradient norm before clipping."),
            "tokens_per_second": gauge(
                "tokens_per_second", "Training tokens (non-padding) per second, gang."
            ),
            "samples_per_second": gauge("samples_per_second", "Training examples per second, whole gang."),
            "step_seconds": gauge("step_seconds", "Wall time of the last optimizer step."),
            "step": gauge("step", "Optimizer steps done."),
            "progress_ratio": gauge("progress_ratio", "step / total steps."),
            "gpu_memory_bytes": gauge("gpu_memory_bytes", "Peak GPU memory allocated by this rank."),
        }
        self.server: Any = None
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)

    def set(self, values: dict[str, float | None]) -> None:
        for key, value in values.items():
            gauge = self.gauges.get(key)
            if gauge is None and key.endswith("_per_second"):  # a task's own unit (images, interactions)
                unit = key.removesuffix("_per_second")
                gauge = self.gauges[key] = Gauge(
                    f"finetune_trainer_{key}", f"Training {unit} per second, gang.", registry=self.registry
                )
            if gauge is not None and value is not None:
                gauge.set(value)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


class Reporter:
    """Everything rank 0 reports. On other ranks every method is a no-op."""

    def __init__(self, cfg: Reporting, output_dir: Path, *, enabled: bool):
        self.enabled = enabled
        self.patcher: StatusPatcher | None = None
        self.prometheus: PrometheusMetrics | None = None
        self._log: Any = None
        if not enabled:
            return
        log_path = Path(cfg.metrics_log)
        if not log_path.is_absolute():
            log_path = output_dir / log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("a", encoding="utf-8")
        try:
            self.prometheus = PrometheusMetrics(cfg.metrics_port)
        except OSError as exc:
            log.warning("metrics port %d unavailable: %s", cfg.metrics_port, exc)
        if cfg.job_name:
            try:
                api = _api_client()
            except Exception as exc:
                log.warning("status reporting off: cannot configure the Kubernetes client: %s", exc)
                api = None
            namespace = cfg.namespace or _pod_namespace()
            if api is not None and namespace:
                self.patcher = StatusPatcher(api, cfg.job_name, namespace, cfg.status_throttle_seconds)
            else:
                log.info("status reporting off (not in a cluster and no %s)", STATUS_KUBECONFIG_ENV)

    def event(self, kind: str, **fields: Any) -> None:
        """One JSON line in the metrics log."""
        if self._log is None:
            return
        record = {"time": now_iso(), "event": kind, **fields}
        self._log.write(json.dumps(record, default=float) + "\n")
        self._log.flush()

    def gauges(self, values: dict[str, float | None]) -> None:
        if self.prometheus is not None:
            self.prometheus.set(values)

    def status(self, status: dict[str, Any]) -> None:
        if self.patcher is not None:
            self.patcher.submit(status)

    def close(self) -> None:
        if self.patcher is not None:
            self.patcher.close()
        if self.prometheus is not None:
            self.prometheus.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _pod_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
