"""The hash chain and its signed checkpoints. Pure: time and keys come in as arguments.

Checkpoints are signed with **Ed25519**, not HMAC: verifying an HMAC needs the same secret that makes
one, so whoever can check the log (an auditor, a CI job, `audit verify`) could also forge it. With
Ed25519 the operator holds the private key (a Secret mounted as a file) and verifiers get only the
public key. Signatures are deterministic (RFC 8032) and 64 bytes; `cryptography` implements them.

A checkpoint is itself a record in the chain (`type: checkpoint`, `verb: Checkpoint`). It signs
`signed_message(seq, prev)`: its own sequence number and the hash of the record before it, i.e. the
whole chain up to there. Rewriting history and recomputing every hash after the edit still breaks the
signature of every later checkpoint; dropping records after the last checkpoint is what no scheme of
this kind can show, so checkpoints come every `checkpoint_every` records and at shutdown.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from finetune_operator.audit.records import GENESIS, AuditRecord, Checkpoint, rfc3339_micro, seal


def signed_message(seq: int, prev: str) -> bytes:
    return f"finetune-operator-audit-v1:{seq}:{prev}".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(data: bytes) -> Ed25519PrivateKey:
    """A PEM (PKCS#8) Ed25519 key, or its raw 32-byte seed (the form `openssl rand 32` gives)."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(stripped, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the audit signing key must be an Ed25519 key")
        return key
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    raise ValueError(f"the audit signing key must be PEM or 32 raw bytes, got {len(data)} bytes")


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """A PEM (SubjectPublicKeyInfo) Ed25519 public key, or its raw 32 bytes."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(stripped)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the audit verification key must be an Ed25519 public key")
        return key
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    raise ValueError(f"the audit verification key must be PEM or 32 raw bytes, got {len(data)} bytes")


def public_pem(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def checkpoint_valid(record: AuditRecord, public: Ed25519PublicKey) -> bool:
    if record.checkpoint is None or record.checkpoint.alg != "ed25519":
        return False
    try:
        public.verify(bytes.fromhex(record.checkpoint.signature), signed_message(record.seq, record.prev))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class Chain:
    """Appends records: numbers them, links each to the last, and makes checkpoints when they are due."""

    signing_key: Ed25519PrivateKey | None = None
    checkpoint_every: int = 100
    seq: int = 0
    """Sequence number of the next record."""
    head: str = GENESIS
    """Hash of the last record."""
    since_checkpoint: int = 0

    @classmethod
    def resume(cls, last: AuditRecord | None, **kwargs: Any) -> Chain:
        """A chain that continues after `last` (e.g. the tail of the audit file after a restart)."""
        if last is None:
            return cls(**kwargs)
        return cls(seq=last.seq + 1, head=last.hash, **kwargs)

    def append(self, fields: Mapping[str, Any], now: datetime) -> AuditRecord:
        record = seal({**fields, "seq": self.seq, "time": rfc3339_micro(now), "prev": self.head})
        self.seq += 1
        self.head = record.hash
        self.since_checkpoint = 0 if record.type == "checkpoint" else self.since_checkpoint + 1
        return record

    def checkpoint_due(self) -> bool:
        return self.since_checkpoint >= self.checkpoint_every

    def checkpoint(self, now: datetime) -> AuditRecord:
        if self.signing_key is None:
            mark = Checkpoint(alg="none")
        else:
            signature = self.signing_key.sign(signed_message(self.seq, self.head)).hex()
            mark = Checkpoint(
                alg="ed25519", key_id=key_id(self.signing_key.public_key()), signature=signature
            )
        return self.append({"type": "checkpoint", "verb": "Checkpoint", "checkpoint": mark}, now)
