#!/usr/bin/env bash
# Set up fastpeft on a fresh machine (CPU): torch first (the CPU wheel), then the rest,
# then build the C++ backend in place. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch before anything that depends on it, or pip pulls the multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q "triton==3.9.0" numpy pybind11 ninja pytest peft transformers safetensors \
  scikit-learn matplotlib tqdm
# --no-build-isolation: build against the torch installed above, never a fresh download.
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -m fastpeft info
