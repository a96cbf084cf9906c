"""Copy the finished outputs to ``output.copyTo`` (the FineTuneJob's ``spec.output.uri``).

Rank 0 calls :func:`copy_outputs` once, after the final export has written the model, the adapter, the
metrics and the model card into ``output.dir``. Destinations go through fsspec, like the dataset reader:
``s3://bucket/prefix`` with s3fs (credentials and a non-AWS endpoint from the standard ``AWS_*`` variables,
``AWS_ENDPOINT_URL`` included), ``file:///path`` or a plain path (a mounted claim for ``pvc://claim/path``).

Commit protocol — a reader never takes a half-written copy for a complete one:

1. an earlier copy's ``COMPLETE`` at the destination is removed first;
2. every file of ``output.dir`` except the model card is copied (local destinations through a temporary
   name and a rename per file; an S3 object only appears once its upload completed);
3. every copied file is checked to be there with its size;
4. the model card ``README.md`` is copied;
5. ``COMPLETE`` is written last: JSON with every file's size, the artifact digest and the time.

So a copy is complete when ``COMPLETE`` exists; the model card alone also means every model file is there.
Nothing at the destination is deleted except our own ``COMPLETE``.

With ``encryption_key_file`` (``output.encryptionKeyFile``) every file, the model card included, is encrypted
(``finetune_trainer.encryption``) into a private temporary folder beside ``output.dir`` and that ciphertext
is uploaded; sizes are checked against it, and ``COMPLETE`` (left in clear: sizes and digests only) records
the algorithm and the key id. ``output.dir`` itself, on the job's own checkpoint claim, stays in clear.

Each file operation is tried up to ``output.copyAttempts`` times on transient errors (connection reset,
throttling, timeouts), waiting 1 s, 2 s, 4 s... in between. A missing bucket or folder and refused access
are not retried here (they won't heal in seconds) but, like every copy failure, end the run with the
retryable exit code: the operator restarts the gang, which resumes from the final checkpoint, exports again
and copies again — time for someone to fix the bucket. Torch-free.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from finetune_trainer.durable import fsync_path, partial_path, write_text_atomically
from finetune_trainer.encryption import ALGORITHM, EncryptionError, encrypt_file, key_id, load_key

log = logging.getLogger(__name__)

#: Written last at the destination; a copy without it is incomplete.
MARKER = "COMPLETE"
#: Copied after every other file, just before the marker.
MODEL_CARD = "README.md"
#: Errors that retrying within seconds cannot fix (s3fs maps NoSuchBucket / AccessDenied onto the first two).
PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)

T = TypeVar("T")


class OutputCopyError(RuntimeError):
    """The copy to ``spec.output.uri`` failed; the trainer exits with ExitCode.RETRYABLE."""


@dataclass(frozen=True)
class CopyResult:
    destination: str
    files: int
    bytes: int


def copy_order(source_dir: Path) -> list[str]:
    """Relative paths of the files to copy, the model card last (a stale marker is never copied)."""
    names = sorted(
        p.relative_to(source_dir).as_posix()
        for p in source_dir.rglob("*")
        if p.is_file() and p.relative_to(source_dir).as_posix() != MARKER
    )
    if MODEL_CARD in names:
        names.remove(MODEL_CARD)
        names.append(MODEL_CARD)
    return names


class _Destination:
    """One fsspec filesystem and root, with retries and the per-file commit for local targets."""

    def __init__(self, url: str, address: str, attempts: int, backoff: float, sleep: Callable[[float], None]):
        import fsspec.core  # lazy: only runs that copy need it
        from fsspec.implementations.local import LocalFileSystem

        self.address, self.attempts, self.backoff, self.sleep = address, attempts, backoff, sleep
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise self.error(
                f"the filesystem for this URL is not installed ({exc}); s3:// needs s3fs"
            ) from exc
        except ValueError as exc:
            raise self.error(f"not a usable URL ({exc})") from exc
        self.root = str(root).rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def error(self, message: str) -> OutputCopyError:
        return OutputCopyError(f"spec.output.uri: copying the outputs to {self.address} failed: {message}")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def retry(self, what: str, operation: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except PERMANENT as exc:
                raise self.error(f"{what}: {type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # transient until proven otherwise: connection, throttling, timeouts
                if attempt == self.attempts:
                    raise self.error(
                        f"{what}: {type(exc).__name__}: {exc} (after {self.attempts} attempts)"
                    ) from exc
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("%s failed (%s), retrying in %.0f s", what, exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def put(self, source: Path, name: str) -> None:
        target = self.path(name)
        if not self.local:
            self.fs.put_file(str(source), target)
            return
        # Local (or mounted claim): a temporary name, fsync, rename: a file is either whole or absent.
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = partial_path(target)
        self.fs.put_file(str(source), tmp)
        fsync_path(tmp)
        os.replace(tmp, target)

    def write_text(self, name: str, text: str) -> None:
        if not self.local:
            self.fs.pipe_file(self.path(name), text.encode())
            return
        target = self.path(name)
        write_text_atomically(target, text)
        fsync_path(os.path.dirname(target) or ".")

    def remove_marker(self) -> None:
        marker = self.path(MARKER)
        self.fs.invalidate_cache()
        if self.fs.exists(marker):
            self.fs.rm_file(marker)

    def size(self, name: str) -> int:
        self.fs.invalidate_cache()
        return int(self.fs.size(self.path(name)))


def check_destination(url: str) -> str | None:
    """Why ``url`` can't be copied to by this trainer (unknown scheme, s3fs missing), or None. Called before
    training, so a destination that can never work fails in seconds, not after the run."""
    import fsspec.core

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        return f"output.copyTo {url!r} (spec.output.uri): {protocol}:// is not installed ({exc})"
    except ValueError as exc:
        return f"output.copyTo {url!r} (spec.output.uri): {exc}"
    return None


def copy_outputs(
    source_dir: Path,
    destination: str,
    *,
    address: str | None = None,
    attempts: int = 4,
    backoff_seconds: float = 1.0,
    extra_marker: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    encryption_key_file: Path | None = None,
) -> CopyResult:
    """Copy every file of ``source_dir`` to ``destination`` with the commit protocol of this module.

    ``address`` is how users know the destination (``pvc://claim/path``), used in messages and the result;
    ``destination`` by default. With ``encryption_key_file`` the copy is encrypted (see the module
    docstring). Raises :class:`OutputCopyError` naming ``spec.output.uri``."""
    address = address or destination
    dest = _Destination(destination, address, attempts, backoff_seconds, sleep)
    names = copy_order(source_dir)
    if not names:
        raise dest.error(f"{source_dir} has no files to copy")
    if encryption_key_file is None:
        return _copy(dest, source_dir, names, extra_marker or {})
    try:
        key = load_key(encryption_key_file, "output.encryptionKeyFile")
    except EncryptionError as exc:
        raise OutputCopyError(f"spec.output.encryptionKeySecretRef: {exc}") from exc
    staging = Path(tempfile.mkdtemp(prefix=f".{source_dir.name}.encrypted-", dir=source_dir.parent))
    try:
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                with (staging / name).open("wb") as handle:
                    encrypt_file(source_dir / name, handle, key, name)
            except OSError as exc:
                raise dest.error(f"encrypting {name} into {staging}: {exc}") from exc
        marker = {"encryption": {"algorithm": ALGORITHM, "keyId": key_id(key).hex()}, **(extra_marker or {})}
        return _copy(dest, staging, names, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy(dest: _Destination, source_dir: Path, names: list[str], extra_marker: dict[str, Any]) -> CopyResult:
    address = dest.address
    if dest.local:
        dest.retry(f"creating {dest.root}", lambda: os.makedirs(dest.root or ".", exist_ok=True))
    dest.retry(f"removing the previous {MARKER}", dest.remove_marker)
    sizes = {name: (source_dir / name).stat().st_size for name in names}
    body = [name for name in names if name != MODEL_CARD]
    for name in body:
        dest.retry(f"uploading {name}", functools.partial(dest.put, source_dir / name, name))
    # Every file must be there, whole, before the model card and the marker say the copy is complete.
    for name in body:
        found = dest.retry(f"checking {name}", functools.partial(dest.size, name))
        if found != sizes[name]:
            raise dest.error(f"{name} has {found} bytes at the destination, {sizes[name]} here")
    if MODEL_CARD in sizes:
        dest.retry(
            f"uploading {MODEL_CARD}", functools.partial(dest.put, source_dir / MODEL_CARD, MODEL_CARD)
        )
    marker = {
        "files": sizes,
        "bytes": sum(sizes.values()),
        "completedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra_marker,
    }
    dest.retry(f"writing {MARKER}", lambda: dest.write_text(MARKER, json.dumps(marker, indent=1) + "\n"))
    log.info("copied %d files (%d bytes) to %s", len(names), marker["bytes"], address)
    return CopyResult(destination=address, files=len(names), bytes=int(marker["bytes"]))
