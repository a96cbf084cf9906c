"""``onnx-int8``: export to ONNX with ``torch.onnx``, quantise with ONNX Runtime, serve with ONNX Runtime.

optimum's ONNX exporter is not used: ``optimum-onnx`` requires ``transformers<4.58`` and this project pins
5.23, so the model's forward (``input_ids``, ``attention_mask`` → logits, no KV cache) is exported with
``torch.onnx.export`` and its weights quantised to int8 with ``onnxruntime.quantization.quantize_dynamic``
(activations quantised at run time, as with ``int8-dynamic``). Without a KV cache in the graph, generation
re-runs the sequence at every step (``backends.RecomputeDecoder``): this method suits classifiers and short
generations; ``int8-dynamic`` is the one for long generations on the CPU.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_server.backends import positions


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: Any, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions(attention_mask),
                use_cache=False,
            )
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits  # type: ignore[no-any-return]


@dataclass
class OnnxBackend:
    session: Any
    size_bytes: int
    directory: Any  # the TemporaryDirectory holding the model, kept alive with the session

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            "input_ids": input_ids.numpy().astype(np.int64),
            "attention_mask": attention_mask.numpy().astype(np.int64),
        }
        (out,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(out)


def _size(path: Path) -> int:
    return sum(
        p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.stem)
    )


def export_and_quantize(model: Any, example_ids: torch.Tensor, *, causal: bool) -> OnnxBackend:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = tempfile.TemporaryDirectory(prefix="finetune-server-onnx-")
    root = Path(directory.name)
    fp32_path, int8_path = root / "model.onnx", root / "model-int8.onnx"
    wrapper = _LogitsOnly(model.float().eval(), causal)
    ids = example_ids if example_ids.dim() == 2 else example_ids[None, :]
    ids = ids.repeat(2, 1) if ids.shape[0] == 1 else ids  # batch 2 so the batch axis stays symbolic
    mask = torch.ones_like(ids)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(fp32_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            dynamo=True,
            external_data=True,
        )
    quantize_dynamic(
        str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, use_external_data_format=False
    )
    for stale in root.iterdir():
        if not stale.name.startswith("model-int8"):
            stale.unlink()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = torch.get_num_threads()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    return OnnxBackend(session, _size(int8_path), directory)
