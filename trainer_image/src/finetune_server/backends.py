"""What runs a model's forward pass: a torch module, or an ONNX Runtime session (``onnx-int8``).

Both answer ``logits(input_ids, attention_mask)`` on torch tensors, which is all the quality gate and the
classifier need. Text generation also needs incremental decoding: :meth:`TorchBackend.start` /
:meth:`TorchBackend.step` keep a KV cache; the ONNX graph is exported without one, so its decoder re-runs the
whole sequence each step (:class:`RecomputeDecoder`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Backend(Protocol):
    #: Serialized size of the weights as served (bytes).
    size_bytes: int

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def serialized_size(module: torch.nn.Module) -> int:
    """Bytes of ``torch.save(state_dict)``: what the weights take on disk as served (shared tensors once)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@dataclass
class DecodeState:
    attention_mask: torch.Tensor
    positions: torch.Tensor
    cache: Any = None
    input_ids: torch.Tensor | None = None


@dataclass
class TorchBackend:
    module: Any
    size_bytes: int = 0
    device: str = "cpu"
    #: Causal LMs get explicit position ids (left padding); classifiers do not take them.
    causal: bool = True

    def __post_init__(self) -> None:
        if not self.size_bytes:
            self.size_bytes = serialized_size(self.module)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            return self.module(input_ids=input_ids, attention_mask=attention_mask).logits  # type: ignore[no-any-return]
        out = self.module(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            use_cache=False,
        )
        return out.logits  # type: ignore[no-any-return]

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, DecodeState]:
        from transformers import DynamicCache

        pos = positions(attention_mask)
        cache = DynamicCache()
        out = self.module(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :], DecodeState(attention_mask, pos[:, -1:], out.past_key_values)

    def step(self, next_ids: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((next_ids.shape[0], 1))], dim=1)
        pos = state.positions + 1
        out = self.module(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=state.cache,
            use_cache=True,
        )
        return out.logits[:, -1, :], DecodeState(mask, pos, out.past_key_values)


class RecomputeDecoder:
    """Incremental decoding over a backend without a KV cache: the whole sequence each step."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, DecodeState]:
        logits = self.backend.logits(input_ids, attention_mask)
        return logits[:, -1, :], DecodeState(attention_mask, positions(attention_mask), input_ids=input_ids)

    def step(self, next_ids: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        assert state.input_ids is not None
        ids = torch.cat([state.input_ids, next_ids[:, None]], dim=1)
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((ids.shape[0], 1))], dim=1)
        logits = self.backend.logits(ids, mask)
        return logits[:, -1, :], DecodeState(mask, state.positions, input_ids=ids)
