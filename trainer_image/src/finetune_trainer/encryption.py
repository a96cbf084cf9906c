"""Artifact encryption at rest: AES-256-GCM over fixed-size chunks, one file at a time. Torch-free.

The trainer encrypts every file it copies to ``output.copyTo`` (``spec.output.uri``) when
``output.encryptionKeyFile`` is set (``finetune_trainer.output_copy``); the server decrypts an encrypted
``modelDir`` into a private folder before it verifies and loads it (``finetune_server.decryption``), so the
rest of the server never sees ciphertext. Both sides use this module, so the format cannot drift.

The key is 32 bytes (AES-256) from a Kubernetes Secret mounted as a file: the raw bytes, or their hex
(64 characters) or base64 (44 characters) spelling; surrounding whitespace is ignored. Make one with
``openssl rand -base64 32``.

File format (all integers big-endian)::

    header  MAGIC (8) | key id (8) | chunk size (4) | nonce prefix (8) | name length (2) | name (UTF-8)
    chunks  AES-GCM(chunk i) + tag (16), for i = 0..n-1; every chunk holds ``chunk size`` plaintext bytes
            except the last, which holds the rest (possibly 0: an empty file is one empty chunk)

Chunk i is sealed with nonce ``nonce prefix | i`` (the prefix is random per written file, so a nonce is never
reused under one key) and associated data ``header | i | final`` (final = 1 for the last chunk, else 0).
So any edited byte fails its chunk's tag; dropping, repeating or reordering chunks fails (the index and the
final flag are authenticated); cutting the file short fails (no chunk marked final); and a file moved to
another name fails the name check (the header, name included, is authenticated by every chunk). The key
id (a digest of the key, not the key) lets a wrong key be named as such before anything is decrypted.
File names and sizes are not hidden.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALGORITHM",
    "CHUNK_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "EncryptionError",
    "decrypt_file",
    "encrypt_file",
    "encrypted_size",
    "is_encrypted",
    "key_id",
    "load_key",
    "read_header",
]

MAGIC = b"FTOENC01"
ALGORITHM = "AES-256-GCM, 4 MiB chunks (finetune_trainer.encryption)"
KEY_BYTES = 32
CHUNK_BYTES = 4 * 1024 * 1024
"""Plaintext per chunk: large enough that the 16-byte tags cost 4 ppm, small enough to keep memory flat
(a multi-GB safetensors file is never held whole)."""
TAG_BYTES = 16
_FIXED = struct.Struct(">8s8sI8sH")


class EncryptionError(ValueError):
    """A key that can't be used, or a file that is not what was encrypted; the message names the file."""


@dataclass(frozen=True)
class Header:
    key_id: bytes
    chunk_bytes: int
    nonce_prefix: bytes
    name: str
    raw: bytes


def key_id(key: bytes) -> bytes:
    """8 bytes that identify ``key`` without revealing it (a domain-separated SHA-256)."""
    return hashlib.sha256(b"finetune.dev artifact key id\0" + key).digest()[:8]


def load_key(path: Path, field: str) -> bytes:
    """The 32-byte key in ``path`` (raw, hex or base64); ``field`` names the setting in errors."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EncryptionError(f"{field}: can't read the key file {path}: {exc.strerror or exc}") from exc
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise EncryptionError(
        f"{field}: {path} does not hold a {KEY_BYTES}-byte key ({len(data)} bytes read; expected "
        f"{KEY_BYTES} raw bytes, {2 * KEY_BYTES} hex digits or base64 of {KEY_BYTES} bytes: "
        "`openssl rand -base64 32`)"
    )


def encrypted_size(plain_bytes: int, name: str, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The size of ``name``'s encrypted file for ``plain_bytes`` of plaintext."""
    chunks = max(1, -(-plain_bytes // chunk_bytes))
    return _FIXED.size + len(name.encode()) + plain_bytes + chunks * TAG_BYTES


def _associated(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">IB", index, 1 if final else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def encrypt_file(
    source: Path, target: BinaryIO, key: bytes, name: str, chunk_bytes: int = CHUNK_BYTES
) -> None:
    """Write ``source`` encrypted to ``target``, bound to ``name`` (its path relative to the artifact)."""
    encoded = name.encode()
    header = _FIXED.pack(MAGIC, key_id(key), chunk_bytes, os.urandom(8), len(encoded)) + encoded
    prefix = header[20:28]
    aead = AESGCM(key)
    target.write(header)
    with source.open("rb") as handle:
        chunk, index = handle.read(chunk_bytes), 0
        while True:
            following = handle.read(chunk_bytes) if len(chunk) == chunk_bytes else b""
            final = not following
            target.write(aead.encrypt(_nonce(prefix, index), chunk, _associated(header, index, final)))
            if final:
                return
            chunk, index = following, index + 1


def read_header(handle: BinaryIO, path: Path) -> Header | None:
    """The header at the start of ``handle``; None when the file is not encrypted (no magic)."""
    fixed = handle.read(_FIXED.size)
    if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
        return None
    _, kid, chunk_bytes, prefix, length = _FIXED.unpack(fixed)
    encoded = handle.read(length)
    if len(encoded) < length or chunk_bytes == 0:
        raise EncryptionError(f"{path}: the encryption header is cut short or damaged")
    try:
        name = encoded.decode()
    except UnicodeDecodeError as exc:
        raise EncryptionError(f"{path}: the encryption header is damaged (name not UTF-8)") from exc
    return Header(kid, chunk_bytes, prefix, name, fixed + encoded)


def is_encrypted(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def decrypt_file(source: Path, target: BinaryIO, key: bytes, relative: str) -> None:
    """Write the plaintext of ``source`` to ``target``.

    ``relative`` is the file's path below the folder being read; the name the file was encrypted under
    must be it, or it below one top-level folder (the trainer names files relative to ``output.dir``, the
    server reads ``output.dir/model``): a file of a deeper folder, such as a checkpoint's, is refused.
    Raises :class:`EncryptionError` for a wrong key, a changed, cut or moved file."""
    with source.open("rb") as handle:
        header = read_header(handle, source)
        if header is None:
            raise EncryptionError(f"{source}: not an encrypted artifact file (no {MAGIC.decode()} header)")
        if header.key_id != key_id(key):
            raise EncryptionError(
                f"{source}: encrypted with key id {header.key_id.hex()}, but the key given has id "
                f"{key_id(key).hex()}: wrong key (use the Secret the FineTuneJob encrypted with)"
            )
        # The trainer names a file relative to output.dir; the artifact is one top-level folder of it.
        if header.name != relative and header.name.partition("/")[2] != relative:
            raise EncryptionError(
                f"{source}: this is the encrypted {header.name!r}, moved or copied to {relative!r}"
            )
        aead = AESGCM(key)
        sealed = header.chunk_bytes + TAG_BYTES
        chunk, index = handle.read(sealed), 0
        while True:
            following = handle.read(sealed) if len(chunk) == sealed else b""
            final = not following
            try:
                plain = aead.decrypt(
                    _nonce(header.nonce_prefix, index), chunk, _associated(header.raw, index, final)
                )
            except InvalidTag:
                raise EncryptionError(
                    f"{source}: chunk {index} (bytes {len(header.raw) + index * sealed}..) fails its "
                    "AES-GCM tag: the file was changed, cut short or extended after it was encrypted"
                ) from None
            target.write(plain)
            if final:
                return
            chunk, index = following, index + 1
