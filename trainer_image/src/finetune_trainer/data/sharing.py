"""One rank prepares, the others wait for its result: a small status file per attempt on the shared volume.

The preparing rank writes ``<store>/attempts/<attempt>.json`` (``preparing``, then ``ready`` with the prepared
folder, or ``failed`` with the error) and touches it every :data:`HEARTBEAT_SECONDS` while it works. A waiting
rank polls that file: ``ready`` → it memory-maps the folder; ``failed`` → it raises the same
:class:`DataError` (so every rank exits with the data-error code and the same message); a file that does not
appear, or stops being touched, means the preparing rank died → a retryable error, never a hang. Waiting
costs no collective, so a preparation longer than the process-group timeout is fine.

``attempt`` is any token the ranks of one attempt share and a later attempt does not (the trainer broadcasts
a random one from rank 0).

:func:`prepare_shared` is the one way every modality (text, images, interactions, object detection) prepares
and shares its data; each gives only its own parts, a :class:`Plan` (the cache key, and how to write the
folder) and a function that opens a published folder:

1. the cache key: ``plan(downloads)`` resolves and reads what the key needs (config, source hashes, ...);
2. a folder ``<store>/<key>`` with ``READY`` in it is reused (a restart, or another attempt with the same
   data): opened, nothing prepared again, the report's ``cache.reused`` says so;
3. else the preparing rank builds into ``<store>/.<key>.<pid>.tmp`` and publishes it by a rename
   (:func:`publish_folder`), so a folder under its final name is always complete;
4. ``data_report.json`` (and ``provenance.json``) is written into ``workdir`` on success and when a
   :class:`DataError` stops the preparation (as far as it got, the error naming the row or field);
5. the other ranks of the attempt wait (:func:`wait_for`) and open the published folder, or raise the
   preparing rank's error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from finetune_trainer.data.compliance import config_digest
from finetune_trainer.data.config import DataConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data.report import CacheRecord, DataReport, write_report
from finetune_trainer.data.sources import ResolvedSource
from finetune_trainer.data.store import READY, forget_mapped_tables
from finetune_trainer.durable import fsync_path, write_text_atomically

__all__ = [
    "HEARTBEAT_SECONDS",
    "Plan",
    "PreparationLostError",
    "Publisher",
    "content_key",
    "prepare_shared",
    "publish_folder",
    "wait_for",
]

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


# ------------------------------------------------------------------------------------ prepare and share
class Prepared(Protocol):
    """What a modality's preparation returns: at least its report and the folder it was opened from."""

    report: DataReport
    folder: Path | None


P = TypeVar("P", bound=Prepared)


@dataclass(frozen=True)
class Plan:
    """A modality's preparation once its cache key is known: ``build(folder)`` writes every file of the
    prepared folder into ``folder`` (an empty private folder, published after) and raises :class:`DataError`
    naming the row or field that stops it."""

    key: str
    build: Callable[[Path], None]


def content_key(
    kind: str,
    layout: str | int,
    cfg: DataConfig,
    sources: Sequence[ResolvedSource],
    model_license: str | None,
    files: Sequence[str | None] = (),
) -> str:
    """``<kind>-`` and 32 hex digits of SHA-256 over what shapes a non-text preparation: its layout version,
    the data config digest, every source (role, address, format, file hashes), the model licence (the
    allowlist reads it) and ``files``, the digests of the files the rows point to (images: an edited image
    gives a new key; None for a row whose file cannot be read). The text pipeline's key, which adds the
    tokenizer, is :func:`finetune_trainer.data.keys.cache_key`."""
    # Augmentation (its seed is the run's; image transforms and negatives are drawn when examples are loaded)
    # does not shape what these preparations write: another seed must not prepare every image again.
    document = {
        "kind": kind,
        "layout": layout,
        "config": config_digest(cfg, exclude={"augmentation"}),
        "sources": [[s.role, s.uri, s.format, [list(h) for h in s.hashes]] for s in sources],
        "modelLicense": model_license,
        "files": hashlib.sha256("\n".join(d or "-" for d in files).encode()).hexdigest(),
    }
    return f"{kind}-" + hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:32]


def publish_folder(tmp: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name, atomically (a rename)."""
    write_text_atomically(tmp / READY, "")
    fsync_path(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process published the same key first: the same examples, keep theirs
        if not (final / READY).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(final.parent)


def prepare_shared(
    what: str,
    workdir: Path,
    report: DataReport,
    plan: Callable[[Path], Plan],
    open_folder: Callable[[Path], P],
    *,
    logger: logging.Logger,
    store: Path | None,
    attempt: str | None,
    wait: bool,
    downloads: Path | None = None,
) -> P:
    """Prepare ``what`` data (``text``, ``images``…: names the temporary folders) once per key and share it
    (the steps in the module's docstring).

    ``report``: the report the plan and the build fill in as they go, written into ``workdir`` when a
    :class:`DataError` stops them. ``plan(downloads)``: the cache key (remote sources are downloaded into
    ``downloads``, by default a temporary folder removed on return). ``open_folder``: the prepared data of a
    published folder. ``logger``: the modality's (its name says which data). ``store``: the cache folder
    (without it a temporary folder, removed when the result is garbage-collected); ``attempt`` (needs
    ``store``): the token of this attempt's ranks; ``wait=True``: wait for the rank that prepares this
    attempt and open its folder (no report written)."""
    if wait:
        if store is None or attempt is None:
            raise ValueError("wait=True needs store= and attempt=")
        folder, reused = wait_for(store, attempt)
        logger.info("data prepared by another rank: opening %s", folder)
        return _opened(open_folder, folder, reused=reused)
    workdir.mkdir(parents=True, exist_ok=True)
    publisher = Publisher(store, attempt) if store is not None and attempt is not None else None
    if publisher is not None:
        publisher.start()
    root = store if store is not None else Path(tempfile.mkdtemp(prefix=f"fto-{what}-prepared-"))
    try:
        with tempfile.TemporaryDirectory(prefix=f"fto-{what}-sources-") as scratch:
            prepared, folder, reused = _prepare_once(
                root, plan(downloads or Path(scratch)), open_folder, logger
            )
    except BaseException as exc:
        if isinstance(exc, DataError):
            write_report(report, workdir)
        if publisher is not None:
            publisher.failed(exc)
        if store is None:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if publisher is not None:
        publisher.ready(folder, reused=reused)
    if store is None:
        weakref.finalize(prepared, shutil.rmtree, root, True)
    write_report(prepared.report, workdir)
    return prepared


def _prepare_once(
    root: Path, plan: Plan, open_folder: Callable[[Path], P], logger: logging.Logger
) -> tuple[P, Path, bool]:
    """The prepared data of ``plan``'s key under ``root``, its folder and whether it was reused."""
    final = root / plan.key
    if (final / READY).is_file():
        logger.info("reusing the prepared data in %s (cache key %s)", final, plan.key)
        return _opened(open_folder, final, reused=True), final, True
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{plan.key}.*.tmp"):  # left by a killed attempt (one preparing rank per key)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{plan.key}.{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        plan.build(tmp)
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        forget_mapped_tables()  # unmap the tables the build mapped (their files moved or are gone)
    logger.info("prepared the data into %s (cache key %s)", final, plan.key)
    return _opened(open_folder, final, reused=False), final, False


def _opened(open_folder: Callable[[Path], P], folder: Path, *, reused: bool) -> P:
    prepared = open_folder(folder)
    prepared.report.cache = CacheRecord(key=folder.name, folder=str(folder), reused=reused)
    prepared.folder = folder
    return prepared
