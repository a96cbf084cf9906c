"""One rank prepares, the others wait for its result: a small status file per attempt on the shared volume.

The preparing rank writes ``<store>/attempts/<attempt>.json`` (``preparing``, then ``ready`` with the prepared
folder, or ``failed`` with the error) and touches it every :data:`HEARTBEAT_SECONDS` while it works. A waiting
rank polls that file: ``ready`` → it memory-maps the folder; ``failed`` → it raises the same
:class:`DataError` (so every rank exits with the data-error code and the same message); a file that does not
appear, or stops being touched, means the preparing rank died → a retryable error, never a hang. Waiting
costs no collective, so a preparation longer than the process-group timeout is fine.

``attempt`` is any token the ranks of one attempt share and a later attempt does not (the trainer broadcasts
a random one from rank 0).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from finetune_trainer.data.errors import DataError
from finetune_trainer.durable import write_text_atomically

__all__ = ["HEARTBEAT_SECONDS", "PreparationLostError", "Publisher", "wait_for"]

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
ATTEMPTS = "attempts"


class PreparationLostError(RuntimeError):
    """The preparing rank stopped without a result (killed, or its node lost): retryable."""


def status_path(store: Path, attempt: str) -> Path:
    return store / ATTEMPTS / f"{attempt}.json"


class Publisher:
    """The preparing rank's side: status file plus heartbeat."""

    def __init__(self, store: Path, attempt: str) -> None:
        self.path = status_path(store, attempt)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"status": "preparing", "pid": os.getpid()})
        self._thread = threading.Thread(target=self._beat, name="data-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError as exc:  # the volume hiccuped: the next beat retries
                log.warning("data preparation heartbeat: %s", exc)

    def _write(self, document: dict[str, Any]) -> None:
        write_text_atomically(self.path, json.dumps(document))

    def _end(self, document: dict[str, Any]) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write(document)

    def ready(self, folder: Path, *, reused: bool) -> None:
        self._end({"status": "ready", "folder": folder.name, "reused": reused})

    def failed(self, exc: BaseException) -> None:
        data_error = isinstance(exc, DataError)
        self._end(
            {
                "status": "failed",
                "message": str(exc) if data_error else f"{type(exc).__name__}: {exc}",
                "reason": exc.reason if isinstance(exc, DataError) else None,
                "dataError": data_error,
            }
        )


def wait_for(
    store: Path,
    attempt: str,
    *,
    start_seconds: float = 900.0,
    stale_seconds: float = 120.0,
    poll_seconds: float = 0.5,
) -> tuple[Path, bool]:
    """Block until the preparing rank of ``attempt`` is done; return its folder and whether it was reused.

    Raises the preparing rank's :class:`DataError`, or :class:`PreparationLostError` when no status file
    appears within ``start_seconds`` or its heartbeat is older than ``stale_seconds``."""
    path = status_path(store, attempt)
    began = time.monotonic()
    delay = 0.05
    while True:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            touched = path.stat().st_mtime
        except FileNotFoundError:
            if time.monotonic() - began > start_seconds:
                raise PreparationLostError(
                    f"no rank started preparing the data within {start_seconds:.0f} s ({path} is missing)"
                ) from None
        else:
            status = document.get("status")
            if status == "ready":
                return store / str(document["folder"]), bool(document.get("reused"))
            if status == "failed":
                if document.get("dataError"):
                    raise DataError(str(document["message"]), reason=str(document["reason"]))
                raise PreparationLostError(f"the preparing rank failed: {document['message']}")
            if time.time() - touched > stale_seconds:
                raise PreparationLostError(
                    f"the preparing rank (pid {document.get('pid')}) stopped without a result: no "
                    f"heartbeat for {time.time() - touched:.0f} s ({path})"
                )
        time.sleep(delay)
        delay = min(poll_seconds, delay * 2)
