"""The worker entry: one process per GPU (or CPU rank), started by torchrun from finetune_trainer.launch.

``python -m finetune_trainer.train --config PATH`` (under torchrun). Runs the loop (finetune_trainer.loop)
and classifies how it ended: exits with an :class:`ExitCode`; a non-zero code is also written to the
exit-code file so the pod entrypoint can report it past torchrun (which rewrites worker codes to 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from finetune_trainer.config import ConfigError, load_config
from finetune_trainer.data.errors import DataError
from finetune_trainer.env import TorchrunEnv
from finetune_trainer.exit_codes import EXIT_CODE_FILE_ENV, ExitCode
from finetune_trainer.modeling import ModelError
from finetune_trainer.output_copy import OutputCopyError

log = logging.getLogger("finetune_trainer")


def write_exit_code(code: int, message: str) -> None:
    """Record the first failing rank's code (and message) for the pod entrypoint."""
    path = os.environ.get(EXIT_CODE_FILE_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{int(code)}\n{message}\n")


def classify(exc: BaseException) -> ExitCode:
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG_ERROR
    if isinstance(exc, DataError):
        return ExitCode.DATA_ERROR
    if isinstance(exc, ModelError):
        return ExitCode.MODEL_ERROR
    return ExitCode.RETRYABLE


def run_worker(config_path: str | Path) -> int:
    env = TorchrunEnv.from_environ()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{env.rank} %(levelname)s %(name)s: %(message)s"
    )
    from finetune_trainer.loop import Trainer

    trainer: Trainer | None = None
    try:
        cfg = load_config(config_path)
        trainer = Trainer(cfg, env)
        code = trainer.run()
        if code is not ExitCode.SUCCESS:
            write_exit_code(code, "preempted: checkpoint saved")
        return int(code)
    except BaseException as exc:  # every failure becomes a documented exit code
        code = classify(exc)
        message = f"{type(exc).__name__}: {exc}"
        log.error("rank %d failed (exit code %d): %s", env.rank, int(code), message)
        if code is ExitCode.RETRYABLE and not isinstance(exc, OutputCopyError):
            traceback.print_exc()
        write_exit_code(code, message)
        return int(code)
    finally:
        if trainer is not None:
            trainer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.train")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run_worker(args.config)


if __name__ == "__main__":
    sys.exit(main())
