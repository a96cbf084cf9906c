"""Bearer API keys from a mounted Secret folder, re-read so that rotated keys work without a restart.

Kubernetes updates a mounted Secret by swapping a ``..data`` symlink; every visible (non-dot) file of the
folder is read, one key per non-empty line. The folder is re-read at most every ``auth.reloadSeconds``; a
key is compared in constant time against every accepted key (``hmac.compare_digest``), so the time taken
does not tell how much of a key matched.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

from finetune_server.config import Auth

log = logging.getLogger(__name__)


def read_keys(directory: Path) -> frozenset[str]:
    files = [p for p in sorted(directory.iterdir()) if not p.name.startswith(".") and p.is_file()]
    return frozenset(
        line.strip() for p in files for line in p.read_text(encoding="utf-8").splitlines() if line.strip()
    )


class KeyRing:
    def __init__(self, config: Auth) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        if not config.api_keys_dir.is_dir():
            raise ValueError(f"auth.apiKeysDir: {config.api_keys_dir} is not a folder")
        self._keys = read_keys(config.api_keys_dir)
        if not self._keys:
            raise ValueError(f"auth.apiKeysDir: {config.api_keys_dir} holds no key")
        self._loaded_at = time.monotonic()

    def keys(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._loaded_at >= self.config.reload_seconds:
            with self._lock:
                try:
                    keys = read_keys(self.config.api_keys_dir)
                except OSError as exc:  # mid-rotation or unmounted: keep the keys we had, say so
                    log.warning("cannot re-read auth.apiKeysDir %s: %s", self.config.api_keys_dir, exc)
                else:
                    if keys != self._keys:
                        log.info("API keys reloaded: %d accepted", len(keys))
                    self._keys = keys
                self._loaded_at = now
        return self._keys

    def accepts(self, token: str) -> bool:
        # Every key is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in self.keys()]
        return any(matches)
