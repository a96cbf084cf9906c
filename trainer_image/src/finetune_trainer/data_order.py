"""Which examples each rank sees at each optimizer step, reproducible from (seed, epoch, step) alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataOrder:
    """A seeded permutation per epoch, cut into global batches; micro-batch j of rank r takes slice
    (j * world + r). Resuming needs only (epoch, step)."""

    num_examples: int
    micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def micro_batches(self, perm: list[int], step_in_epoch: int, rank: int) -> list[list[int]]:
        start = step_in_epoch * self.global_batch
        chunk = perm[start : start + self.global_batch]
        return [
            chunk[
                (j * self.world_size + rank) * self.micro_batch : (j * self.world_size + rank + 1)
                * self.micro_batch
            ]
            for j in range(self.accumulation)
        ]
