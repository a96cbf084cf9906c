"""Process group, device and the few collectives the loop needs (all no-ops in a single process)."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from finetune_trainer.env import TorchrunEnv


class Distributed:
    """The rank's view of the gang: device, rank, and collectives that degrade to no-ops when alone."""

    def __init__(self, env: TorchrunEnv, *, use_deepspeed: bool, timeout_seconds: int = 1800):
        self.env = env
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
            self.device = torch.device("cuda", env.local_rank)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        self.active = False
        if use_deepspeed:
            # DeepSpeed reads DS_ACCELERATOR when imported; on a CPU-only machine force its CPU accelerator.
            if backend == "gloo":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_seconds))
            self.active = True
        elif env.world_size > 1:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
            self.active = True

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (all-reduce max)."""
        if not (self.active and self.world_size > 1):
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def sum(self, values: list[float]) -> list[float]:
        if not (self.active and self.world_size > 1):
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not (self.active and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` concatenated in rank order, on every rank (all_gather_object)."""
        if not (self.active and self.world_size > 1):
            return list(items)
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, items)
        return [item for box in boxes for item in box]

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
            self.active = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
