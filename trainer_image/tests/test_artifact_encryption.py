"""Artifact encryption at rest: the trainer's copy is AES-256-GCM ciphertext, the server decrypts it before it
reads anything, and a wrong or missing key, a changed byte, a cut or moved file is refused naming the file."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import pytest

from finetune_server.__main__ import EXIT_INVALID_CONFIG, main
from finetune_server.artifact import read_artifact
from finetune_server.config import ServerConfig
from finetune_server.decryption import decrypted_config
from finetune_server.errors import ArtifactError
from finetune_trainer.config import ConfigError, parse_config
from finetune_trainer.encryption import (
    EncryptionError,
    decrypt_file,
    encrypt_file,
    encrypted_size,
    key_id,
    load_key,
)
from finetune_trainer.output_copy import MARKER, OutputCopyError, copy_outputs
from finetune_trainer.serving_files import MANIFEST_FILE, SERVING_FILE, file_sha256

MODEL_FILES = {
    "model/config.json": b'{"model_type": "llama"}',
    "model/model.safetensors": os.urandom(10_000),
    "model/tokenizer.json": b"{}",
    "model/empty.txt": b"",
    "model/" + SERVING_FILE: json.dumps({"task": "causal-lm"}).encode(),
}


def write_key(path: Path, key: bytes | None = None) -> bytes:
    key = key or os.urandom(32)
    path.write_text(base64.b64encode(key).decode() + "\n")
    return key


def fake_outputs(root: Path) -> Path:
    """An output.dir as the export leaves it: a model folder with its sha256 manifest, metrics, a card."""
    for name, data in {**MODEL_FILES, "metrics.json": b"{}", "README.md": b"# card"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    model = root / "model"
    digests = {p.name: file_sha256(p) for p in model.iterdir()}
    (model / MANIFEST_FILE).write_text(json.dumps({"files": digests}))
    return root


def encrypted_copy(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """(the encrypted copy's root, the key file, the key): what a FineTuneJob with encryption leaves."""
    out = fake_outputs(tmp_path / "out")
    key_file = tmp_path / "key"
    key = write_key(key_file)
    dest = tmp_path / "store" / "v1"
    copy_outputs(out, f"file://{dest}", encryption_key_file=key_file)
    return dest, key_file, key


def server_config(model_dir: Path, tmp_path: Path, key_file: Path | None) -> ServerConfig:
    encryption = {"keyFile": str(key_file), "decryptDir": str(tmp_path / "plain")} if key_file else {}
    return ServerConfig.model_validate(
        {"modelDir": str(model_dir), "modelName": "m", "encryption": encryption}
    )


def test_the_copy_is_ciphertext_and_the_server_reads_the_plaintext(tmp_path: Path) -> None:
    dest, key_file, key = encrypted_copy(tmp_path)
    marker = json.loads((dest / MARKER).read_text())
    assert marker["encryption"]["keyId"] == key_id(key).hex()
    for name, data in MODEL_FILES.items():
        stored = (dest / name).read_bytes()
        assert len(stored) == encrypted_size(len(data), name) == marker["files"][name]
        if len(data) >= 16:
            assert data not in stored
    assert b"# card" not in (dest / "README.md").read_bytes()

    config = decrypted_config(server_config(dest / "model", tmp_path, key_file))
    assert config.model_dir == tmp_path / "plain" / "modelDir"
    for name, data in MODEL_FILES.items():
        assert (config.model_dir / name.removeprefix("model/")).read_bytes() == data
    # The server's own reading of the artifact, manifest check included, sees plaintext.
    artifact = read_artifact(config.model_dir, task=None, verify=True)
    assert (artifact.task, artifact.verified_files) == ("causal-lm", len(MODEL_FILES))


def test_a_restarted_server_decrypts_afresh_over_its_earlier_copy(tmp_path: Path) -> None:
    dest, key_file, _ = encrypted_copy(tmp_path)
    first = decrypted_config(server_config(dest / "model", tmp_path, key_file)).model_dir
    (first / "config.json").write_bytes(b"left over")
    again = decrypted_config(server_config(dest / "model", tmp_path, key_file)).model_dir
    assert (again / "config.json").read_bytes() == MODEL_FILES["model/config.json"]


def test_a_wrong_key_is_named_before_anything_is_decrypted(tmp_path: Path) -> None:
    dest, _, key = encrypted_copy(tmp_path)
    wrong = tmp_path / "wrong"
    write_key(wrong)
    with pytest.raises(ArtifactError, match=r"modelDir: .*wrong key") as info:
        decrypted_config(server_config(dest / "model", tmp_path, wrong))
    assert key_id(key).hex() in str(info.value)
    assert not (tmp_path / "plain" / "modelDir").exists()


def test_an_encrypted_model_without_a_key_is_refused_naming_the_field(tmp_path: Path) -> None:
    dest, _, _ = encrypted_copy(tmp_path)
    with pytest.raises(ArtifactError, match=r"^encryption\.keyFile: modelDir .* is encrypted"):
        decrypted_config(server_config(dest / "model", tmp_path, None))


def test_the_server_process_exits_with_the_config_error_for_a_wrong_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest, _, _ = encrypted_copy(tmp_path)
    wrong = tmp_path / "wrong"
    write_key(wrong)
    path = tmp_path / "server.json"
    path.write_text(
        json.dumps({"modelDir": str(dest / "model"), "modelName": "m", "encryption": {"keyFile": str(wrong)}})
    )
    assert main(["--config", str(path)]) == EXIT_INVALID_CONFIG
    assert "wrong key" in capsys.readouterr().err


def test_a_tampered_byte_is_detected_and_nothing_is_left_in_clear(tmp_path: Path) -> None:
    dest, key_file, _ = encrypted_copy(tmp_path)
    weights = dest / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: chunk 0 .* fails its AES-GCM tag"):
        decrypted_config(server_config(dest / "model", tmp_path, key_file))
    assert not (tmp_path / "plain" / "modelDir").exists()


def test_a_key_for_a_model_in_clear_and_a_mixed_folder_are_refused(tmp_path: Path) -> None:
    out = fake_outputs(tmp_path / "out")
    key_file = tmp_path / "key"
    write_key(key_file)
    with pytest.raises(ArtifactError, match=r"encryption\.keyFile is set but modelDir .* is not encrypted"):
        decrypted_config(server_config(out / "model", tmp_path, key_file))
    dest, key_file, _ = encrypted_copy(tmp_path / "second")
    (dest / "model" / "extra.bin").write_bytes(b"dropped in beside the artifact")
    with pytest.raises(ArtifactError, match=r"mixes encrypted files with files in clear \(extra\.bin\)"):
        decrypted_config(server_config(dest / "model", tmp_path, key_file))


def test_a_model_in_clear_without_a_key_is_served_as_before(tmp_path: Path) -> None:
    out = fake_outputs(tmp_path / "out")
    config = server_config(out / "model", tmp_path, None)
    assert decrypted_config(config) == config


CHUNK = 64


def sealed(tmp_path: Path, data: bytes, key: bytes, name: str = "model/w.bin") -> bytes:
    source = tmp_path / "plain.bin"
    source.write_bytes(data)
    target = io.BytesIO()
    encrypt_file(source, target, key, name, chunk_bytes=CHUNK)
    return target.getvalue()


def opened(tmp_path: Path, blob: bytes, key: bytes, relative: str = "w.bin") -> bytes:
    path = tmp_path / "sealed.bin"
    path.write_bytes(blob)
    out = io.BytesIO()
    decrypt_file(path, out, key, relative)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_round_trip_at_chunk_boundaries(tmp_path: Path, size: int) -> None:
    key, data = os.urandom(32), os.urandom(size)
    blob = sealed(tmp_path, data, key)
    assert len(blob) == encrypted_size(size, "model/w.bin", CHUNK)
    assert opened(tmp_path, blob, key) == data


def test_every_changed_byte_fails_its_tag(tmp_path: Path) -> None:
    key = os.urandom(32)
    blob = sealed(tmp_path, os.urandom(2 * CHUNK + 10), key)
    header = len(blob) - (2 * CHUNK + 10) - 3 * 16
    for position in range(header, len(blob), 7):
        changed = bytearray(blob)
        changed[position] ^= 0x80
        with pytest.raises(EncryptionError, match="fails its AES-GCM tag"):
            opened(tmp_path, bytes(changed), key)


def test_cut_extended_reordered_or_moved_files_are_refused(tmp_path: Path) -> None:
    key = os.urandom(32)
    data = os.urandom(3 * CHUNK)
    blob = sealed(tmp_path, data, key)
    sealed_chunk = CHUNK + 16
    header = len(blob) - 3 * sealed_chunk
    chunks = [blob[header + i * sealed_chunk : header + (i + 1) * sealed_chunk] for i in range(3)]
    for damaged in (
        blob[:-sealed_chunk],  # last chunk dropped at a chunk boundary
        blob[:-1],  # cut inside the last chunk
        blob + chunks[2],  # last chunk repeated
        blob[:header] + chunks[1] + chunks[0] + chunks[2],  # two chunks swapped
    ):
        with pytest.raises(EncryptionError, match="fails its AES-GCM tag"):
            opened(tmp_path, damaged, key)
    with pytest.raises(EncryptionError, match=r"encrypted 'model/w\.bin', moved or copied to 'x\.bin'"):
        opened(tmp_path, blob, key, relative="x.bin")
    with pytest.raises(EncryptionError, match="not an encrypted artifact file"):
        opened(tmp_path, data, key)
    # A file of a deeper folder (a checkpoint's copy of the model) does not pass for the artifact's own.
    deeper = sealed(tmp_path, data, key, name="checkpoints/step-10/model/w.bin")
    with pytest.raises(EncryptionError, match=r"moved or copied to 'w\.bin'"):
        opened(tmp_path, deeper, key)


def test_key_files_raw_hex_base64_and_bad_ones(tmp_path: Path) -> None:
    key = os.urandom(32)
    for name, content in (("raw", key), ("hex", key.hex().encode() + b"\n"), ("b64", base64.b64encode(key))):
        (tmp_path / name).write_bytes(content)
        assert load_key(tmp_path / name, "encryption.keyFile") == key
    (tmp_path / "short").write_text("c2hvcnQ=")
    with pytest.raises(EncryptionError, match=r"^encryption\.keyFile: .*short does not hold a 32-byte key"):
        load_key(tmp_path / "short", "encryption.keyFile")
    with pytest.raises(EncryptionError, match=r"^encryption\.keyFile: can't read the key file"):
        load_key(tmp_path / "missing", "encryption.keyFile")


def test_the_trainer_refuses_a_bad_key_before_copying_anything(tmp_path: Path) -> None:
    out = fake_outputs(tmp_path / "out")
    (tmp_path / "key").write_text("not a key")
    dest = tmp_path / "store"
    with pytest.raises(OutputCopyError, match=r"^spec\.output\.encryptionKeySecretRef: .*32-byte key"):
        copy_outputs(out, f"file://{dest}", encryption_key_file=tmp_path / "key")
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "out"]  # no staging folder left


def test_the_trainer_config_needs_copy_to_for_encryption() -> None:
    with pytest.raises(ConfigError, match=r"output\.encryptionKeyFile: encryption applies to the copy"):
        parse_config(
            {
                "model": {"path": "/models/m"},
                "data": {"source": "/data/d.jsonl"},
                "output": {"dir": "/out", "encryptionKeyFile": "/k"},
            }
        )
    config = parse_config(
        {
            "model": {"path": "/models/m"},
            "data": {"source": "/data/d.jsonl"},
            "output": {"dir": "/out", "copyTo": "s3://b/p", "encryptionKeyFile": "/k"},
        }
    )
    assert config.output.encryption_key_file == "/k"


def test_a_real_trainer_artifact_encrypted_at_rest_is_served(trained_artifact: Path, tmp_path: Path) -> None:
    """The trainer's real output, copied encrypted, served by ``python -m finetune_server`` with the key:
    it answers like the artifact in clear (greedy decoding, same prompt, same text)."""
    from server_fixtures import running_server, write_server_config

    key_file = tmp_path / "key"
    write_key(key_file)
    dest = tmp_path / "store"
    copy_outputs(trained_artifact.parent, f"file://{dest}", encryption_key_file=key_file)
    weights = next(p for p in (dest / "model").iterdir() if p.suffix == ".safetensors")
    assert b"__metadata__" not in weights.read_bytes()[:4096], "the stored weights are ciphertext"
    request = {"model": "tiny", "prompt": "word: abc\nfirst:", "max_tokens": 4, "temperature": 0}
    answers = []
    for model_dir, encryption in (
        (trained_artifact, {}),
        (dest / "model", {"keyFile": str(key_file), "decryptDir": str(tmp_path / "plain")}),
    ):
        run = tmp_path / f"run-{len(answers)}"
        run.mkdir()
        config = write_server_config(run, model_dir, qualityGate={"enabled": False}, encryption=encryption)
        with running_server(config) as base:
            answer = httpx.post(f"{base}/v1/completions", json=request, timeout=60)
            assert answer.status_code == 200, answer.text
            answers.append(answer.json()["choices"][0]["text"])
    assert answers[0] == answers[1]
