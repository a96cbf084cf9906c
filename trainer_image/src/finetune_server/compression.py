"""Compression at load: one registry from ``quantization.method`` (and ``pruning.method``) to a function.

Every quantiser takes the loaded fp model and returns the :class:`~finetune_server.backends.Backend` that
serves it. The device check happens before any weight is read (``finetune_server.config.resolve_device``);
each CUDA function checks again that its library is importable and says which package is missing.

``int8-dynamic`` uses ``torch.ao.quantization.quantize_dynamic`` (qint8 weights, activations quantised per
batch, fbgemm/onednn kernels). On this CPU (2 cores, torch 2.15, torchao 0.18) it was measured against
torchao's ``Int8DynamicActivationInt8WeightConfig``: torch.ao's packed kernels were the faster of the two
for a 100M Llama-style model at batch 1 and 8 with the same perplexity change (``benchmarks/serving.py``
records the comparison, key ``int8_torchao_speedup``); torchao's int8 path targets CUDA and
``torch.compile``. torch.ao warns that it is deprecated; when it is removed this one function changes.
GPT-2 style ``Conv1D`` layers (a transposed Linear) are converted to ``nn.Linear`` first so that every
linear layer is quantised.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_server.backends import Backend, TorchBackend
from finetune_server.config import PruningMethod, QuantizationMethod, ServerConfig
from finetune_server.errors import ArtifactError


@dataclass(frozen=True)
class CompressionContext:
    config: ServerConfig
    device: str
    #: Where the fp model lies (bitsandbytes quantises while loading, so it reloads from here).
    model_dir: Path
    #: Reloads the model with extra ``from_pretrained`` arguments (quantization_config=...).
    reload: Callable[..., Any]
    causal: bool
    #: An example input for exporters (``onnx-int8``).
    example_ids: torch.Tensor


Quantizer = Callable[[Any, CompressionContext], Backend]


def conv1d_to_linear(model: torch.nn.Module) -> int:
    """Replace GPT-2 style ``Conv1D`` (weight ``[in, out]``) by the equivalent ``nn.Linear``.

    Returns how many were replaced."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(
                    child.weight.shape[0], child.weight.shape[1], dtype=child.weight.dtype
                )
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def _none(model: Any, ctx: CompressionContext) -> Backend:
    return TorchBackend(model, device=ctx.device, causal=ctx.causal)


def _int8_dynamic(model: Any, ctx: CompressionContext) -> Backend:
    conv1d_to_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # torch.ao's deprecation notice; see the docstring
        quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    return TorchBackend(quantized, device="cpu", causal=ctx.causal)


def _onnx_int8(model: Any, ctx: CompressionContext) -> Backend:
    from finetune_server.onnx_int8 import export_and_quantize

    conv1d_to_linear(model)
    return export_and_quantize(model, ctx.example_ids, causal=ctx.causal)


def _require(package: str, method: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ArtifactError(f"quantization.method: {method} needs the {package} package, not installed here")


def _bitsandbytes(method: str) -> Quantizer:
    def quantize(model: Any, ctx: CompressionContext) -> Backend:
        _require("bitsandbytes", method)
        from transformers import BitsAndBytesConfig

        del model  # bitsandbytes quantises while loading
        if method == "bnb-int8":
            config = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
        else:
            config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        reloaded = ctx.reload(quantization_config=config, device_map={"": 0})
        return TorchBackend(
            reloaded, size_bytes=int(reloaded.get_memory_footprint()), device="cuda", causal=ctx.causal
        )

    return quantize


def _torchao(method: str) -> Quantizer:
    def quantize(model: Any, ctx: CompressionContext) -> Backend:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            quantize_,
        )

        if method == "fp8-dynamic":
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                raise ArtifactError(
                    f"quantization.method: fp8-dynamic needs compute capability 8.9 or newer; this GPU has "
                    f"{major}.{minor} (use bnb-int8 or int4-weight-only)"
                )
            config: Any = Float8DynamicActivationFloat8WeightConfig()
        else:
            config = Int4WeightOnlyConfig(group_size=128)
        model = model.to(device="cuda", dtype=torch.bfloat16)
        conv1d_to_linear(model)
        quantize_(model, config)
        return TorchBackend(model, device="cuda", causal=ctx.causal)

    return quantize


QUANTIZERS: dict[QuantizationMethod, Quantizer] = {
    "none": _none,
    "int8-dynamic": _int8_dynamic,
    "onnx-int8": _onnx_int8,
    "bnb-int8": _bitsandbytes("bnb-int8"),
    "bnb-nf4": _bitsandbytes("bnb-nf4"),
    "int4-weight-only": _torchao("int4-weight-only"),
    "fp8-dynamic": _torchao("fp8-dynamic"),
}


def quantize(model: Any, ctx: CompressionContext) -> Backend:
    return QUANTIZERS[ctx.config.quantization.method](model, ctx)


def prune(model: torch.nn.Module, method: PruningMethod, sparsity: float) -> float:
    """Prune in place; returns the measured fraction of zero weights over the pruned layers."""
    from finetune_server.pruning import PRUNERS

    conv1d_to_linear(model)
    return PRUNERS[method](model, sparsity)
