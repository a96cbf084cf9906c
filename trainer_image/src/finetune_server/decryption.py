"""Serving an artifact the trainer encrypted at rest: decrypt it into a private folder, then serve that.

Runs once at start, before the artifact is read (``__main__``): the config's ``modelDir`` (and
``baseModelDir``) are replaced by their decrypted copies, so the manifest check, the quality sample and the
model loaders only ever see plaintext and need no change. Every file must be encrypted with the configured
key, or none may be:

- an encrypted folder without ``encryption.keyFile``: refused, naming that field;
- a key for a folder in clear, or a folder mixing clear and encrypted files: refused (a file dropped in
  beside an encrypted artifact is not served);
- a wrong key, or a file changed, cut short or moved after encryption: refused, naming the file
  (``finetune_trainer.encryption``); nothing of a failed folder is left behind.

The plaintext is written under ``encryption.decryptDir`` (default: a new folder under TMPDIR, which the
operator points at the pod's scratch emptyDir); it lives as long as the pod. Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from finetune_server.config import ServerConfig
from finetune_server.errors import ArtifactError
from finetune_trainer.encryption import EncryptionError, decrypt_file, is_encrypted, load_key

log = logging.getLogger(__name__)


def encrypted_files(directory: Path) -> tuple[list[str], list[str]]:
    """(encrypted, in clear) relative paths of the files under ``directory``."""
    encrypted: list[str] = []
    clear: list[str] = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        (encrypted if is_encrypted(path) else clear).append(relative)
    return encrypted, clear


def decrypt_tree(source: Path, target: Path, key: bytes) -> int:
    """Decrypt every file of ``source`` into ``target`` (created; must not exist). Returns the file count.
    On any failure ``target`` is removed and the error (naming the file) raised."""
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    target.mkdir(parents=True, mode=0o700)
    try:
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                decrypt_file(source / name, handle, key, name)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return len(names)


def _plain_dir(directory: Path, field: str, key: bytes | None, decrypt_root: Path, *, trained: bool) -> Path:
    """``trained``: the folder is the FineTuneJob's artifact (so with a key it must be encrypted); a base
    model comes from elsewhere and may be in clear."""
    if not directory.is_dir():
        return directory  # read_artifact names the missing folder
    encrypted, clear = encrypted_files(directory)
    if not encrypted:
        if key is not None and clear and trained:
            raise ArtifactError(
                f"encryption.keyFile is set but {field} {directory} is not encrypted; serving it in clear "
                "would hide a replaced artifact (unset encryption.keyFile to serve a clear one)"
            )
        return directory
    if key is None:
        raise ArtifactError(
            f"encryption.keyFile: {field} {directory} is encrypted ({len(encrypted)} files); mount the key "
            "the FineTuneJob encrypted with and set encryption.keyFile"
        )
    if clear:
        shown = ", ".join(clear[:5]) + (" ..." if len(clear) > 5 else "")
        raise ArtifactError(
            f"{field} {directory} mixes encrypted files with files in clear ({shown}): not an artifact "
            "the trainer wrote"
        )
    target = decrypt_root / field
    if target.exists():
        # A restarted container finds its own earlier copy: never serve plaintext we did not just check.
        shutil.rmtree(target)
    try:
        count = decrypt_tree(directory, target, key)
    except EncryptionError as exc:
        raise ArtifactError(f"{field}: {exc}") from None
    log.info("decrypted %d files of %s into %s", count, directory, target)
    return target


def decrypted_config(config: ServerConfig) -> ServerConfig:
    """``config`` with ``modelDir``/``baseModelDir`` pointing at plaintext; unchanged when nothing is
    encrypted and no key is configured. Raises :class:`ArtifactError` naming the field."""
    settings = config.encryption
    key = None
    if settings.key_file is not None:
        try:
            key = load_key(settings.key_file, "encryption.keyFile")
        except EncryptionError as exc:
            raise ArtifactError(str(exc)) from None
    root = settings.decrypt_dir or Path(tempfile.mkdtemp(prefix="finetune-server-decrypted-"))
    try:
        model_dir = _plain_dir(config.model_dir, "modelDir", key, root, trained=True)
        base_dir = config.base_model_dir
        if base_dir is not None:
            base_dir = _plain_dir(base_dir, "baseModelDir", key, root, trained=False)
    except BaseException:
        if settings.decrypt_dir is None:  # our own folder: nothing decrypted stays behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    if model_dir == config.model_dir and base_dir == config.base_model_dir:
        if settings.decrypt_dir is None:
            root.rmdir()
        return config
    return config.model_copy(update={"model_dir": model_dir, "base_model_dir": base_dir})
