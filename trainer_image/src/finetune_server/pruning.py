"""Magnitude pruning of linear layers (``pruning.method``): unstructured, or 2:4 semi-structured.

The output head (the layer whose output is the vocabulary or the classes) and embeddings are left dense, as
in SparseGPT and Wanda: pruning them costs far more quality than it saves. Unstructured pruning uses
``torch.nn.utils.prune.l1_unstructured`` per layer; 2:4 zeroes the 2 smallest of every 4 consecutive weights
of a row (``in_features`` must be a multiple of 4; other layers stay dense and are not counted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import prune as torch_prune

#: Names of output heads left dense.
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "out_proj"})


def _prunable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    layers = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf not in HEAD_NAMES:
            layers.append((name, module))
    return layers


def _zero_fraction(layers: list[torch.nn.Linear]) -> float:
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in layers)
    return zeros / total if total else 0.0


def magnitude(model: torch.nn.Module, sparsity: float) -> float:
    layers = [layer for _, layer in _prunable(model)]
    for layer in layers:
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)  # type: ignore[no-untyped-call]
        torch_prune.remove(layer, "weight")  # type: ignore[no-untyped-call]
    return _zero_fraction(layers)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """1 for the 2 largest-magnitude weights of every group of 4 along the input dimension, else 0."""
    rows, columns = weight.shape
    groups = weight.detach().abs().reshape(rows, columns // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(rows, columns)


def semi_structured(model: torch.nn.Module, sparsity: float) -> float:
    del sparsity  # always 0.5
    layers = [layer for _, layer in _prunable(model) if layer.in_features % 4 == 0]
    for layer in layers:
        torch_prune.custom_from_mask(layer, "weight", two_four_mask(layer.weight))  # type: ignore[no-untyped-call]
        torch_prune.remove(layer, "weight")  # type: ignore[no-untyped-call]
    return _zero_fraction(layers)


def _none(model: torch.nn.Module, sparsity: float) -> float:
    return 0.0


PRUNERS: dict[str, Callable[[torch.nn.Module, float], float]] = {
    "none": _none,
    "magnitude": magnitude,
    "2:4": semi_structured,
}
