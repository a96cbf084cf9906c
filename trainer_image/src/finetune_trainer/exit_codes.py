"""The trainer's exit codes: the one place they are defined.

The operator maps them onto the FineTuneJob's status (see finetune_operator.builders.trainer_job's
podFailurePolicy): non-retryable codes fail the job at once; anything else is charged against
``scheduling.maxRestarts`` and restarts the whole gang from the newest checkpoint.

Codes avoid 1 and 2 (generic errors, usage), 126/127 (exec errors) and >= 128 (signals), because torchrun
and shells use those. torchrun rewrites worker exit codes to 1, so the pod's entrypoint re-raises the
code that the failing rank wrote to ``EXIT_CODE_FILE`` (see finetune_trainer.launch).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    SUCCESS = 0
    #: Preempted (SIGTERM) after saving a checkpoint; restart and resume. Charged as a retryable failure.
    PREEMPTED = 10
    #: Any other failure that a restart may fix (OOM, lost peer, I/O error). Retryable.
    RETRYABLE = 11
    #: The trainer config is invalid (unknown key, wrong type, impossible combination). Never retried.
    CONFIG_ERROR = 3
    #: The dataset is unusable (bad-row ratio exceeded, empty split, licence not allowed). Never retried.
    DATA_ERROR = 4
    #: The base model cannot be loaded (missing, incompatible). Never retried.
    MODEL_ERROR = 5


NON_RETRYABLE: frozenset[int] = frozenset({ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR, ExitCode.MODEL_ERROR})

#: Reasons shown in the FineTuneJob's Failed condition for each non-retryable code.
REASONS: dict[int, str] = {
    ExitCode.CONFIG_ERROR: "InvalidTrainerConfig",
    ExitCode.DATA_ERROR: "InvalidData",
    ExitCode.MODEL_ERROR: "ModelLoadFailed",
}

#: Where a failing rank records its code so that the pod entrypoint can exit with it after torchrun.
EXIT_CODE_FILE_ENV = "FTO_EXIT_CODE_FILE"
