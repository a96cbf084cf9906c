"""Where audit records go: stdout (JSON lines for log collectors), rotating files, Kubernetes Events.

The only I/O of the audit package. A sink never raises into the caller: a reconcile or an admission
review must not fail because a disk is full. Failures are counted in `SinkHealth`, which the audit log
turns into metrics, a probe entry and a condition, and the file sink keeps what it could not write in a
bounded backlog that it writes, in order, once the disk takes writes again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from finetune_operator.audit.records import AuditRecord, parse_line

logger = logging.getLogger(__name__)

FILE_PATTERN = re.compile(r"^audit-(\d{6})\.jsonl$")
"""Rotated files are numbered, never renamed: `ls` and shell globs list them in chain order."""


@dataclass
class SinkHealth:
    name: str
    ok: bool = True
    error: str = ""
    failures: int = 0
    """Write attempts that failed (each retry that fails counts)."""
    backlog: int = 0
    """Records waiting to be written."""
    dropped: int = 0
    """Records given up on because the backlog was full."""


class Sink(Protocol):
    health: SinkHealth

    def write(self, record: AuditRecord, line: str) -> None: ...

    def retry(self) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """One JSON line per record on stdout (the stream is looked up on every write, so tests can swap it)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self.health = SinkHealth("stdout")

    def write(self, record: AuditRecord, line: str) -> None:
        stream = self._stream or sys.stdout
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:
            self.health.failures += 1
            self.health.dropped += 1
            self.health.ok, self.health.error = False, str(exc)
        else:
            self.health.ok, self.health.error = True, ""

    def retry(self) -> None:
        return None

    def close(self) -> None:
        return None


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def chain_files(directory: Path) -> list[Path]:
    """The audit files of a directory in chain order."""
    found = (
        [path for path in directory.iterdir() if FILE_PATTERN.match(path.name)] if directory.is_dir() else []
    )
    return sorted(found, key=lambda path: path.name)


class RotatingFileSink:
    """Appends to `audit-NNNNNN.jsonl` in `directory`; starts the next file before one would pass
    `max_bytes`. The chain simply continues in the next file (the first record there links to the last
    one of the previous file), so `audit verify DIR/audit-*.jsonl` checks across rotations.

    On a failed write (ENOSPC, EROFS, EACCES...) the partial line is cut off again, the record goes to
    the backlog, and writes are retried every `retry_seconds` (on the next record or `retry()`); the
    backlog is written first, in order, so the file chain has no gap unless the backlog overflowed
    (then `dropped` counts the records lost to the file; stdout still has them).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        keep_files: int = 0,
        backlog_limit: int = 100_000,
        retry_seconds: float = 5.0,
        fsync: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"audit file max_bytes must be at least 1024, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.retry_seconds = retry_seconds
        self.fsync = fsync
        self._clock = clock
        self._backlog: deque[bytes] = deque()
        self._backlog_limit = backlog_limit
        self._file: IO[bytes] | None = None
        self._size = 0
        """Bytes of complete lines in the current file: where to cut a partial write back to."""
        self._index = 1
        self._next_retry = 0.0
        self.health = SinkHealth("file")
        files = chain_files(directory)
        if files:
            self._index = int(FILE_PATTERN.match(files[-1].name).group(1))  # type: ignore[union-attr]

    @property
    def current_path(self) -> Path:
        return self.directory / file_name(self._index)

    def tail(self) -> AuditRecord | None:
        """The last complete record on disk, to resume the chain after a restart. A partial last line
        (the process died mid-write) is cut off, with a warning."""
        for path in reversed(chain_files(self.directory)):
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                logger.warning(
                    "audit file %s: cutting off a partial last line (%d bytes)", path, len(data) - end
                )
                os.truncate(path, end)
                data = data[:end]
            lines = data.splitlines()
            if lines:
                return parse_line(lines[-1].decode())
        return None

    def write(self, record: AuditRecord, line: str) -> None:
        data = (line + "\n").encode()
        if self._backlog or not self.health.ok:
            self._enqueue(data)
            if self._clock() >= self._next_retry:
                self.retry()
            return
        try:
            self._write(data)
        except OSError as exc:
            self._failed(exc)
            self._enqueue(data)

    def retry(self) -> None:
        """Write the backlog, oldest first; stop at the first failure."""
        if self.health.ok and not self._backlog:
            return
        try:
            while self._backlog:
                self._write(self._backlog[0])
                self._backlog.popleft()
        except OSError as exc:
            self._failed(exc)
        else:
            logger.warning("audit file sink recovered: %s", self.current_path)
            self.health.ok, self.health.error = True, ""
        self.health.backlog = len(self._backlog)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                logger.warning("audit file sink: close failed: %s", exc)
            self._file = None

    def _enqueue(self, data: bytes) -> None:
        if len(self._backlog) >= self._backlog_limit:
            self._backlog.popleft()
            self.health.dropped += 1
        self._backlog.append(data)
        self.health.backlog = len(self._backlog)

    def _failed(self, exc: OSError) -> None:
        if self.health.ok:
            logger.error("audit file sink failing (%s): records are kept in memory and retried", exc)
        self.health.ok, self.health.error = False, f"{type(exc).__name__}: {exc}"
        self.health.failures += 1
        self._next_retry = self._clock() + self.retry_seconds
        self._discard_partial()

    def _discard_partial(self) -> None:
        """Cut the current file back to its last complete line, so no half record stays in the chain."""
        self.close()
        try:
            path = self.current_path
            if path.exists() and path.stat().st_size > self._size:
                os.truncate(path, self._size)
        except OSError as exc:
            logger.warning("audit file sink: could not cut a partial line yet (%s); retried later", exc)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.current_path
            self._file = path.open("ab", buffering=0)
            self._size = path.stat().st_size
            if self._size > 0:
                # An earlier failure may have left a partial line that could not be cut then.
                data = path.read_bytes()
                end = data.rfind(b"\n") + 1
                if end < len(data):
                    self._file.close()
                    os.truncate(path, end)
                    self._file = path.open("ab", buffering=0)
                    self._size = end
        return self._file

    def _write(self, data: bytes) -> None:
        handle = self._open()
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            self.close()
            self._index += 1
            self._size = 0
            handle = self._open()
            self._prune()
        view = memoryview(data)
        while view:
            written = handle.write(view)
            if not written:
                raise OSError("short write")
            view = view[written:]
        if self.fsync:
            os.fsync(handle.fileno())
        self._size += len(data)

    def _prune(self) -> None:
        if self.keep_files <= 0:
            return
        for path in chain_files(self.directory)[: -self.keep_files]:
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("audit file sink: could not remove old file %s: %s", path, exc)


class EventSink:
    """Posts the human-visible subset as Kubernetes Events on the resource (`kubectl describe` shows
    them): refused admission requests and the operator actions in `actions`. Posting runs in the
    background on the running loop; a failed post is logged by the poster and never blocks."""

    def __init__(
        self,
        post: Callable[[AuditRecord], Coroutine[Any, Any, None]],
        *,
        actions: frozenset[str],
    ) -> None:
        self._post = post
        self.actions = actions
        self.health = SinkHealth("events")
        self._tasks: set[asyncio.Task[None]] = set()

    def wants(self, record: AuditRecord) -> bool:
        if not record.name or not record.namespace:
            return False
        if record.type == "admission":
            return record.allowed is False
        return record.type == "action" and record.verb in self.actions

    def write(self, record: AuditRecord, line: str) -> None:
        if not self.wants(record):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.health.dropped += 1
            return
        task = loop.create_task(self._post(record))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.health.failures += 1
            self.health.error = str(task.exception())

    def retry(self) -> None:
        return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
