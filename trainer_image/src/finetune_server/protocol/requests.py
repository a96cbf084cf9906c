"""Checks every non-generative endpoint makes of a request before any work: the model it names is the one
served here, and the number of inputs is within ``limits.maxPredictInputs``."""

from __future__ import annotations

from finetune_server.config import Limits
from finetune_server.errors import ModelNotFoundError, PayloadTooLargeError


def check_request(served: str, requested: str, count: int, limits: Limits, *, field: str = "inputs") -> None:
    if requested != served:
        raise ModelNotFoundError(
            f"model: {requested!r} is not served here; this server serves {served!r}", param="model"
        )
    if count > limits.max_predict_inputs:
        raise PayloadTooLargeError(
            f"{field}: {count} {field} is above this server's limit of {limits.max_predict_inputs} "
            "(limits.maxPredictInputs)",
            param=field,
        )
