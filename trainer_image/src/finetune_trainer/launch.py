"""The pod entrypoint: ``python -m finetune_trainer --config PATH``.

1. Pre-flight: parse and validate the config (exit ``CONFIG_ERROR`` before any GPU work), check that a local
   model exists (``MODEL_ERROR``), that QLoRA has CUDA and that ``output.copyTo`` has an installed
   filesystem (``CONFIG_ERROR``).
2. On multi-node pods, wait until ``PET_MASTER_ADDR`` resolves (``FTO_MASTER_WAIT_SECONDS``, default 300;
   ``RETRYABLE`` when it never does).
3. Start ``torchrun --max-restarts=0 --shutdown-timeout=S -m finetune_trainer.train --config PATH`` as a
   child, forwarding SIGTERM/SIGINT/SIGHUP to it (we are PID 1 in the pod; PID 1 ignores signals it has no
   handler for). torchrun reads the rank wiring from ``PET_*`` variables set by the operator (PET_NNODES,
   PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); without them it runs standalone
   (one node, a free port).
4. torchrun turns every worker failure into exit code 1, so the failing rank writes its code to the
   exit-code file (``FTO_EXIT_CODE_FILE``, default a fresh temp file); we exit with that code, or
   ``RETRYABLE`` when no rank recorded one, or 0 when torchrun succeeded.

The message of the failing rank is also written to ``/dev/termination-log`` when it exists (the pod's
``terminationMessagePath``) so it shows in the pod status. Torch-free at import: the operator imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from finetune_trainer.config import ConfigError, TrainerConfig, load_config
from finetune_trainer.env import TorchrunEnv
from finetune_trainer.exit_codes import EXIT_CODE_FILE_ENV, ExitCode

#: Where Kubernetes reads a container's termination message by default.
TERMINATION_LOG = Path("/dev/termination-log")

#: Seconds to wait for the rendezvous host (PET_MASTER_ADDR) to resolve before giving up (retryable).
MASTER_WAIT_ENV = "FTO_MASTER_WAIT_SECONDS"

#: The environment torchrun reads for multi-node rank wiring (set by the operator on each pod).
TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def pod_command(config_path: str) -> list[str]:
    """The container command the operator puts in the trainer pod."""
    return ["python", "-m", "finetune_trainer", "--config", config_path]


def torchrun_command(
    config_path: str, *, shutdown_timeout: int, environ: Mapping[str, str], python: str = sys.executable
) -> list[str]:
    """The torchrun invocation for this pod. Multi-node wiring comes from PET_* variables (torchrun reads
    them itself); without PET_MASTER_ADDR it runs standalone on a free port."""
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--max-restarts=0",
        f"--shutdown-timeout={shutdown_timeout}",
    ]
    if not environ.get("PET_MASTER_ADDR") and environ.get("PET_NNODES", "1") == "1":
        cmd.append("--standalone")
    cmd += ["-m", "finetune_trainer.train", "--config", config_path]
    return cmd


def write_termination_message(message: str) -> None:
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message[-4000:], encoding="utf-8")


def preflight(config_path: str) -> TrainerConfig:
    """Validation that needs no GPU work; raises ConfigError or ModelError."""
    cfg = load_config(config_path)
    from finetune_trainer.modeling import check_cuda_requirements, check_model_source
    from finetune_trainer.tasks import make_task

    # A task whose model is not a Hugging Face folder checks its own source (recommendation's definition).
    own_check = getattr(make_task(cfg), "check_model_source", None)
    if own_check is not None:
        own_check()
    else:
        check_model_source(cfg.model)
    check_cuda_requirements(cfg)
    if cfg.output.copy_to:
        from finetune_trainer.output_copy import check_destination

        problem = check_destination(cfg.output.copy_to)
        if problem:
            raise ConfigError(problem)
    return cfg


def wait_for_master(host: str, *, timeout_seconds: float, interval: float = 1.0) -> bool:
    """Wait until the rendezvous host resolves. Pod 0's name (``<job>-0.<svc>``) is often not in DNS for
    some seconds after the pods start, and torchrun treats "host not found" as fatal."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            socket.getaddrinfo(host, None)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)


def read_exit_code(path: Path) -> tuple[int | None, str]:
    try:
        first, _, message = path.read_text(encoding="utf-8").partition("\n")
        return int(first.strip()), message.strip()
    except (OSError, ValueError):
        return None, ""


def run_torchrun(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="trainer config (YAML or JSON)")
    parser.add_argument("--check", action="store_true", help="only run the pre-flight checks")
    args = parser.parse_args(argv)

    if TorchrunEnv.from_environ().launched:
        # Already under a launcher (someone ran torchrun -m finetune_trainer): be the worker.
        from finetune_trainer.train import run_worker

        return run_worker(args.config)

    from finetune_trainer.modeling import ModelError

    try:
        cfg = preflight(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        write_termination_message(f"config error: {exc}")
        return int(ExitCode.CONFIG_ERROR)
    except ModelError as exc:
        print(f"model error: {exc}", file=sys.stderr)
        write_termination_message(f"model error: {exc}")
        return int(ExitCode.MODEL_ERROR)
    if args.check:
        return int(ExitCode.SUCCESS)

    master = os.environ.get("PET_MASTER_ADDR")
    wait = float(os.environ.get(MASTER_WAIT_ENV, "300"))
    if master and not wait_for_master(master, timeout_seconds=wait):
        message = f"rendezvous host {master} did not resolve within {wait:.0f}s"
        print(message, file=sys.stderr)
        write_termination_message(message)
        return int(ExitCode.RETRYABLE)

    scratch = None
    code_file = os.environ.get(EXIT_CODE_FILE_ENV)
    if not code_file:
        scratch = tempfile.mkdtemp(prefix="fto-exit-")
        code_file = os.path.join(scratch, "exit-code")
        os.environ[EXIT_CODE_FILE_ENV] = code_file
    Path(code_file).unlink(missing_ok=True)
    try:
        rc = run_torchrun(
            torchrun_command(
                args.config, shutdown_timeout=cfg.distributed.shutdown_timeout_seconds, environ=os.environ
            )
        )
        if rc == 0:
            return int(ExitCode.SUCCESS)
        code, message = read_exit_code(Path(code_file))
        if code is None:
            code, message = (
                int(ExitCode.RETRYABLE),
                f"torchrun exited with {rc} and no rank recorded a reason",
            )
        write_termination_message(message)
        print(f"trainer failed: exit code {code}: {message}", file=sys.stderr)
        return code
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
