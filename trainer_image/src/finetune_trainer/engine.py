"""The optimisation engine: DeepSpeed directly, or plain PyTorch for one process without ZeRO.

Why DeepSpeed directly (not accelerate or the HF Trainer): we own the loop, so checkpoint commit, resume
position, the SIGTERM agreement and reporting are ours and testable; ``deepspeed.initialize`` gets a
client torch optimizer (no JIT-compiled fused Adam on CPU) and our LR scheduler. A single process with
``zeroStage: 0`` skips DeepSpeed: ZeRO has nothing to shard there and the engine costs per-step time.

The engines know nothing of the task: they call ``task.forward`` and ``task.loss``
(finetune_trainer.tasks.base.TrainingTask) on the module they wrap.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from finetune_trainer.config import Hyperparameters, LrScheduler, Offload, TrainerConfig
from finetune_trainer.deepspeed_config import resolve_deepspeed_config
from finetune_trainer.env import TorchrunEnv
from finetune_trainer.modeling import TORCH_DTYPES
from finetune_trainer.tasks.base import Batch

if TYPE_CHECKING:
    from finetune_trainer.tasks.base import TrainingTask


#: Where ``polynomial`` decays to, as in transformers' ``get_scheduler`` (an absolute learning rate).
POLYNOMIAL_LR_END = 1e-7


def lr_lambda(hp: Hyperparameters, total_steps: int) -> Any:
    """The learning-rate factor per optimizer step: linear warm-up, then the schedule of transformers'
    ``get_scheduler`` of the same name (``polynomial`` with power 1; ``constant`` has no warm-up). A plain
    function of the step rather than ``get_scheduler`` itself: DeepSpeed wraps the optimizer, and the
    wrapper lacks the ``defaults`` that the polynomial schedule reads."""
    schedule = hp.lr_scheduler
    if schedule is LrScheduler.CONSTANT:
        warmup = 0
    else:
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total_steps)
    lr_end = min(POLYNOMIAL_LR_END, hp.learning_rate)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule in (LrScheduler.CONSTANT, LrScheduler.CONSTANT_WITH_WARMUP):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule is LrScheduler.LINEAR:
            return 1.0 - progress
        if schedule is LrScheduler.POLYNOMIAL:
            return ((hp.learning_rate - lr_end) * (1.0 - progress) + lr_end) / hp.learning_rate
        if schedule is LrScheduler.COSINE_WITH_RESTARTS:
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((hp.lr_cycles * progress) % 1.0)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, hp: Hyperparameters, *, offload: bool) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm weights."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = {"lr": hp.learning_rate, "betas": (hp.adam_beta1, hp.adam_beta2), "eps": hp.adam_epsilon}
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)  # type: ignore[no-any-return]
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)  # type: ignore[arg-type]


def deepspeed_config(
    cfg: TrainerConfig, world_size: int, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The operator's rendered DeepSpeed JSON (``FTO_DEEPSPEED_CONFIG``) when mounted, else computed."""
    return resolve_deepspeed_config(
        cfg,
        world_size,
        pin_memory=torch.cuda.is_available(),
        environ=os.environ if environ is None else environ,
    )


class Engine(Protocol):
    """What the training loop needs from an optimisation backend."""

    module: nn.Module

    def train_micro_batch(self, batch: Batch) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached loss."""

    def optimizer_step(self) -> float | None:
        """Finish the optimizer step after the last micro-batch; returns the gradient norm when known."""

    def learning_rate(self) -> float: ...

    def eval_forward(self, batch: Batch) -> Any:
        """The task's outputs for ``batch`` as evaluation computes them (autocast; no gradients is the
        caller's ``evaluating``)."""

    def train(self, mode: bool = True) -> None: ...

    def save(self, directory: Path) -> None:
        """Model, optimizer and scheduler state into ``directory``; called on every rank."""

    def load(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None on other ranks); called on every rank."""


class TorchEngine:
    """One process, no ZeRO: a plain PyTorch loop with autocast for bf16/fp16."""

    def __init__(
        self,
        cfg: TrainerConfig,
        model: nn.Module,
        device: torch.device,
        total_steps: int,
        task: TrainingTask,
    ):
        self.cfg = cfg
        self.task = task
        self.module = model.to(device) if not getattr(model, "is_loaded_in_4bit", False) else model
        self.device = device
        hp = cfg.hyperparameters
        self.optimizer = build_optimizer(model, hp, offload=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(hp, total_steps))
        self.accumulation = hp.gradient_accumulation_steps
        dtype = TORCH_DTYPES[cfg.distributed.precision]
        self.autocast_dtype = None if dtype is torch.float32 else dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_micro_batch(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            outputs = self.task.forward(self.module, batch)
        loss = self.task.loss(outputs, batch)
        self.scaler.scale(loss / self.accumulation).backward()  # type: ignore[no-untyped-call]
        return loss.detach()

    def optimizer_step(self) -> float | None:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.hyperparameters.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm if max_norm > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def eval_forward(self, batch: Batch) -> Any:
        with self._autocast():
            return self.task.forward(self.module, batch)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path) -> None:
        trainable = {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save(
            {
                "model": trainable,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            directory / "engine.pt",
        )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=False)
        missing = self.module.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unexpected weights: {missing.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine:
    """``deepspeed.initialize`` with a client optimizer and our LR schedule; ZeRO 0-3, offload, bf16/fp16."""

    TAG = "engine"

    def __init__(
        self,
        cfg: TrainerConfig,
        model: nn.Module,
        env: TorchrunEnv,
        total_steps: int,
        ds_config: dict[str, Any],
        task: TrainingTask,
    ):
        import deepspeed

        self.cfg = cfg
        self.task = task
        hp = cfg.hyperparameters
        optimizer = build_optimizer(model, hp, offload=cfg.distributed.offload is not Offload.NONE)
        factor = lr_lambda(hp, total_steps)

        def scheduler(wrapped: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            # Built on DeepSpeed's wrapped optimizer: ZeRO-3 regroups the parameters.
            return torch.optim.lr_scheduler.LambdaLR(wrapped, factor)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.module = self.engine.module

    def train_micro_batch(self, batch: Batch) -> torch.Tensor:
        # Through the DeepSpeed engine (its forward hooks gather ZeRO-3 parameters and cast to bf16/fp16).
        loss = self.task.loss(self.task.forward(self.engine, batch), batch)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary
        return loss.detach()

    def optimizer_step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def eval_forward(self, batch: Batch) -> Any:
        return self.task.forward(self.engine, batch)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.distributed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return state if torch.distributed.get_rank() == 0 else None
        if torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


def uses_deepspeed(cfg: TrainerConfig, env: TorchrunEnv) -> bool:
    return env.world_size > 1 or cfg.distributed.zero_stage > 0 or cfg.distributed.offload is not Offload.NONE


@contextlib.contextmanager
def evaluating(engine: Engine) -> Iterator[None]:
    engine.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train(True)
