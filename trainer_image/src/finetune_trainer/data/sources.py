"""Resolve a configured source into local files, hashing every byte on the way.

Local paths, mounted PVCs and ``file://`` are read in place. Remote sources (``s3://`` through fsspec + s3fs,
credentials from the standard AWS environment variables; ``http(s)://`` through fsspec's HTTP filesystem) are
copied once into ``workdir/sources/`` so that every later stage reads a local file and the provenance hash is
of exactly the bytes that were used. A Hugging Face ``datasets`` save_to_disk folder must be local (or on a
mounted volume). ``hf://org/name[@revision]`` loads a Hub dataset with ``datasets.load_dataset``: from the
local Hugging Face cache when ``HF_HUB_OFFLINE=1`` (or without network), else downloading it; the provenance
hashes are those of the dataset's Arrow cache files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.data.config import DataFormat
from finetune_trainer.data.errors import DataError

__all__ = ["ResolvedSource", "resolve_source", "sha256_file"]

_EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
#: Files that mark a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHUNK = 1 << 20
#: Remote errors that a restart will not fix (missing object, no access, bad URL): a data error. Anything else
#: (connection reset, timeout) propagates and the trainer exits with the retryable code.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


@dataclass(frozen=True)
class ResolvedSource:
    """One readable input: a local file (or a saved-dataset folder) and what it came from."""

    uri: str
    path: Path
    format: str
    role: str
    #: sha256 per file: one entry for a file, one per file for a saved-dataset folder.
    hashes: tuple[tuple[str, str, int], ...]


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _format_of(path: str, configured: DataFormat) -> str:
    if configured != "auto":
        return configured
    lowered = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if lowered.endswith(suffix):
            raise DataError(
                f"{path}: compressed files are not supported; decompress it or use parquet",
                reason="UnsupportedFormat",
            )
    fmt = _EXTENSIONS.get(Path(lowered).suffix)
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension; "
            "set format to jsonl, csv, parquet or hf-disk",
            reason="UnsupportedFormat",
        )
    return fmt


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _HF_DISK_MARKERS)


def _url_to_fs(uri: str) -> tuple[Any, str]:
    import fsspec.core  # lazy: only remote sources need it

    try:
        return fsspec.core.url_to_fs(uri)  # type: ignore[no-any-return]
    except ImportError as exc:
        raise DataError(
            f"{uri}: the filesystem for this URL is not installed ({exc}). s3:// needs the s3fs package.",
            reason="SourceUnreadable",
        ) from exc


def _strip_file_scheme(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" not in uri:
        return uri
    return None


def _local_files(root: str, fmt: DataFormat, role: str) -> list[ResolvedSource]:
    path = Path(root)
    if fmt in ("auto", "hf-disk") and _is_hf_disk(path):
        files = sorted(p for p in path.rglob("*") if p.is_file())
        hashes = tuple((str(p.relative_to(path)), *sha256_file(p)) for p in files)
        return [ResolvedSource(uri=root, path=path, format="hf-disk", role=role, hashes=hashes)]
    if fmt == "hf-disk":
        raise DataError(f"{root}: not a datasets save_to_disk folder", reason="SourceUnreadable")
    if any(ch in root for ch in "*?["):
        candidates = sorted(Path(p) for p in _glob(root))
    elif path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS)
    elif path.is_file():
        candidates = [path]
    else:
        raise DataError(f"{root}: no such file or directory", reason="SourceUnreadable")
    if not candidates:
        raise DataError(f"{root}: matches no data files", reason="SourceUnreadable")
    resolved = []
    for candidate in candidates:
        digest, size = sha256_file(candidate)
        resolved.append(
            ResolvedSource(
                uri=str(candidate),
                path=candidate,
                format=_format_of(str(candidate), fmt),
                role=role,
                hashes=((candidate.name, digest, size),),
            )
        )
    return resolved


def _glob(pattern: str) -> list[str]:
    import glob

    return [p for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]


def _download(uri: str, fmt: DataFormat, role: str, cache_dir: Path) -> list[ResolvedSource]:
    fs, path = _url_to_fs(uri)
    try:
        if any(ch in path for ch in "*?["):
            remote_paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            remote_paths = sorted(
                p for p in fs.find(path) if Path(p).suffix.lower() in _EXTENSIONS and not fs.isdir(p)
            )
        else:
            remote_paths = [path]
    except _PERMANENT as exc:
        raise DataError(f"{uri}: cannot list ({exc})", reason="SourceUnreadable") from exc
    if not remote_paths:
        raise DataError(f"{uri}: matches no data files", reason="SourceUnreadable")
    resolved = []
    for remote in remote_paths:
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        remote_uri = remote if "://" in remote else f"{protocol}://{remote}"
        name = Path(remote.split("?", 1)[0]).name or "data"
        target = cache_dir / hashlib.sha256(remote_uri.encode()).hexdigest()[:16] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # ranks may download at once
        digest = hashlib.sha256()
        size = 0
        try:
            with fs.open(remote, "rb") as src, partial.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
        except _PERMANENT as exc:
            raise DataError(f"{remote_uri}: cannot read ({exc})", reason="SourceUnreadable") from exc
        os.replace(partial, target)
        resolved.append(
            ResolvedSource(
                uri=remote_uri,
                path=target,
                format=_format_of(name, fmt),
                role=role,
                hashes=((name, digest.hexdigest(), size),),
            )
        )
    return resolved


def load_hub_dataset(uri: str, hf_split: str) -> Any:
    """The split of an ``hf://org/name[@revision]`` dataset (local cache first)."""
    import datasets

    name, _, revision = uri[len("hf://") :].partition("@")
    try:
        return datasets.load_dataset(name, revision=revision or None, split=hf_split)
    except (
        OSError,
        ValueError,
    ) as exc:  # ConnectionError (offline, not cached), FileNotFoundError, bad split
        raise DataError(
            f"{uri}: cannot load split {hf_split!r} from the Hugging Face cache or Hub: {exc}",
            reason="SourceUnreadable",
        ) from exc


def _hub(uri: str, role: str, hf_split: str) -> ResolvedSource:
    dataset = load_hub_dataset(uri, hf_split)
    files = sorted(Path(entry["filename"]) for entry in dataset.cache_files)
    hashes = tuple((p.name, *sha256_file(p)) for p in files)
    return ResolvedSource(uri=uri, path=Path(), format="hf-hub", role=role, hashes=hashes)


def resolve_source(
    uri: str, fmt: DataFormat, *, role: str, cache_dir: Path, hf_split: str = "train"
) -> list[ResolvedSource]:
    """Expand ``uri`` (file, directory, glob, saved dataset, Hub dataset or remote URL) into hashed inputs."""
    if uri.startswith("hf://"):
        return [_hub(uri, role, hf_split)]
    local = _strip_file_scheme(uri)
    if local is not None:
        return _local_files(local, fmt, role)
    return _download(uri, fmt, role, cache_dir)
