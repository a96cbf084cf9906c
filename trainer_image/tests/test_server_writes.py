"""The server writes only where its pod has volumes: the scratch emptyDir (through HOME, TMPDIR and the cache
variables the operator sets, builders/security.py) and the feedback folder. Its root filesystem is read-only
in the pod (Pod Security `restricted`), so a write anywhere else would fail there.

The server runs as a pod runs it, under a Python audit hook (``sys.addaudithook``) that records the path of
every open for writing, every created, renamed or removed file and folder; it loads with the method that
writes most (``onnx-int8`` exports and quantises through temporary files), answers a request and takes
feedback. Writes by native code that bypass Python's file functions are not seen.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from server_fixtures import running_server, write_server_config
from trainer_fixtures import trainer_env

AUDITED_LAUNCHER = r"""
import os, sys

LOG = os.open(os.environ.pop("FTO_WRITE_LOG"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> (path argument, its dir_fd argument or None), as sys.audit passes them
PATHS = {
    "os.mkdir": [(0, 2)], "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.chmod": [(0, 2)],
    "os.utime": [(0, 3)], "os.truncate": [(0, None)], "os.rename": [(0, 2), (1, 3)],
    "os.link": [(1, 3)], "os.symlink": [(1, 2)],
}

def written(event, args):
    if event == "open":
        return [(args[0], None)] if args[2] & WRITE_FLAGS else []
    return [(args[i], None if j is None else args[j]) for i, j in PATHS.get(event, ())]

def hook(event, args):
    for path, dir_fd in written(event, args):
        if isinstance(path, (str, bytes, os.PathLike)):
            relative_to_fd = dir_fd is not None and dir_fd >= 0
            base = os.readlink(f"/proc/self/fd/{dir_fd}") if relative_to_fd else os.getcwd()
            full = os.path.normpath(os.path.join(base, os.fsdecode(path)))
            if event != "open" and os.path.lexists(full) == (event == "os.mkdir"):
                continue  # it fails, or does nothing, on a read-only filesystem too (os.makedirs(exist_ok))
            os.write(LOG, f"{event} {full}\n".encode())

sys.addaudithook(hook)
sys.argv[0] = "finetune_server"
from finetune_server.__main__ import main
sys.exit(main())
"""


def test_the_server_writes_only_to_scratch_and_the_feedback_volume(
    trained_artifact: Path, tmp_path: Path
) -> None:
    scratch, feedback, cwd = tmp_path / "scratch", tmp_path / "feedback", tmp_path / "workdir"
    for volume in (scratch, feedback, cwd):  # the pod's mount points exist
        volume.mkdir()
    writes = tmp_path / "writes.log"
    config = write_server_config(
        tmp_path,
        trained_artifact,
        quantization={"method": "onnx-int8", "maxQualityDrop": 0.05},
        feedback={"enabled": True, "dir": str(feedback)},
    )
    env = trainer_env(
        # The pod's environment (builders/security.scratch_env); XDG_* as they resolve there, under HOME.
        HOME=str(scratch),
        TMPDIR=str(scratch),
        HF_HOME=f"{scratch}/hf",
        TORCH_EXTENSIONS_DIR=f"{scratch}/torch_extensions",
        MPLCONFIGDIR=f"{scratch}/matplotlib",
        XDG_CACHE_HOME=f"{scratch}/.cache",
        XDG_CONFIG_HOME=f"{scratch}/.config",
        FTO_WRITE_LOG=str(writes),
    )
    for inherited in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # torch in this process sets the first
        env.pop(inherited, None)
    with running_server(config, launcher=("-c", AUDITED_LAUNCHER), cwd=cwd, env=env) as base:
        health = httpx.get(f"{base}/readyz", timeout=10).json()
        assert [q["method"] for q in health["quality"]] == ["onnx-int8"], health
        answer = httpx.post(
            f"{base}/v1/completions",
            json={"model": "tiny", "prompt": "word: kite\nfirst:\n", "max_tokens": 3},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        rating = {"request_id": answer.json()["id"], "rating": "up"}
        assert httpx.post(f"{base}/v1/feedback", json=rating, timeout=10).status_code == 201

    writes_by_path = {line.split(" ", 1)[1]: line for line in writes.read_text().splitlines()}
    assert any(p.startswith(f"{scratch}/") for p in writes_by_path), "the ONNX export went through TMPDIR"
    assert any(p.startswith(f"{feedback}/") for p in writes_by_path), "feedback was written"
    allowed = (f"{scratch}/", f"{feedback}/", "/dev/")
    elsewhere = sorted(line for path, line in writes_by_path.items() if not path.startswith(allowed))
    assert elsewhere == [], "written outside the pod's volumes"
