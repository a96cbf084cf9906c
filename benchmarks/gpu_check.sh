#!/usr/bin/env bash
# GPU check (not CI; for a lent H200): bf16 ZeRO-3 on one GPU through the real trainer entrypoint with a
# ~1.1B-parameter random-initialised Llama-style model for a few dozen steps. Prints one JSON line with
# tokens/s and MFU (convention and peak in the line). Must finish in under 5 minutes.
#   bash benchmarks/gpu_check.sh            # STEPS=40 MICRO_BATCH=4 SEQ=2048 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python

if ! "$PY" -c "import torch, transformers, deepspeed, peft, pydantic, yaml, prometheus_client, matplotlib, kubernetes" 2>/dev/null; then
  echo "installing the trainer extra (pinned by constraints.txt)" >&2
  if ! "$PY" -m pip install -q -c constraints.txt ".[trainer,gpu]" >&2; then
    echo '{"benchmark": "gpu_check", "error": "trainer dependencies missing and pip install failed"}'
    exit 1
  fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo '{"benchmark": "gpu_check", "error": "no CUDA GPU visible"}'
  exit 1
fi
exec timeout --signal=TERM 295 "$PY" benchmarks/gpu/zero3_mfu.py
