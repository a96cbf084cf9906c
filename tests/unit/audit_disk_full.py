"""Child process of the full-disk test: fills a real small filesystem (or hits a real file-size limit),
records audit entries while the file sink fails, frees space, retries, and copies the files out.

`python -m tests.unit.audit_disk_full MODE AUDIT_DIR COPY_DIR` where MODE is `tmpfs` (AUDIT_DIR is a
tiny tmpfs mounted by the caller: writes fail with ENOSPC) or `rlimit` (RLIMIT_FSIZE: writes fail with
EFBIG). Prints the audit records on stdout (the stdout sink) and one JSON line of sink health per phase
on stderr.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import sys
from pathlib import Path

from finetune_operator.audit.chain import Chain
from finetune_operator.audit.log import AuditLog
from finetune_operator.audit.sinks import RotatingFileSink, StdoutSink, chain_files

JOB = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"namespace": "team-a", "name": "llama", "uid": "u-1", "generation": 1},
    "spec": {"task": "causal-lm"},
}


def report(phase: str, log: AuditLog) -> None:
    health = next(h for h in log.health() if h.name == "file")
    status, reason, _ = log.condition()
    line = {"phase": phase, "ok": health.ok, "backlog": health.backlog, "failures": health.failures}
    print(json.dumps({**line, "error": health.error, "condition": status, "reason": reason}), file=sys.stderr)


def main(mode: str, audit_dir: Path, copy_dir: Path) -> None:
    file_sink = RotatingFileSink(audit_dir, max_bytes=1 << 20, retry_seconds=0.0)
    log = AuditLog([StdoutSink(), file_sink], Chain(checkpoint_every=1000))
    for attempt in range(5):
        log.action("ChildCreated", JOB, detail=f"Job/team-a/llama-{attempt}")
    report("before", log)
    filler = audit_dir / "filler"
    if mode == "tmpfs":
        with filler.open("wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"x" * 4096)
            except OSError:
                pass
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_sink.current_path.stat().st_size + 100, hard))
    for attempt in range(20):
        log.action("Restarted", JOB, detail=f"attempt {attempt}")
    report("full", log)
    if mode == "tmpfs":
        filler.unlink()
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    log.retry()
    report("recovered", log)
    for attempt in range(5):
        log.action("ChildDeleted", JOB, detail=f"Job/team-a/llama-{attempt}")
    log.close()
    report("closed", log)
    for path in chain_files(audit_dir):
        shutil.copy(path, copy_dir / path.name)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
