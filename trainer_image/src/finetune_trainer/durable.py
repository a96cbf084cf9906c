"""Local writes that survive the pod dying at any moment: a file is either whole or absent. Torch-free.

Used by the checkpoint commit (``checkpoint.py``) and the copy to a local ``output.copyTo``
(``output_copy.py``): write under a hidden temporary name, fsync, rename onto the final name.
"""

from __future__ import annotations

import os
from pathlib import Path


def partial_path(target: str | Path) -> str:
    """A hidden temporary name next to ``target``, private to this process (renamed onto it once whole)."""
    head, tail = os.path.split(os.fspath(target))
    return os.path.join(head, f".{tail}.{os.getpid()}.partial")


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's data (a folder: the renames in it) to the storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name, fsync it, and rename it onto ``path``."""
    tmp = partial_path(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
