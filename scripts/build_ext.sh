#!/usr/bin/env bash
# Rebuild the C++ backend in place (incremental, ninja). A lock serialises concurrent builds.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/fastpeft_build.lock env MAX_JOBS=${MAX_JOBS:-2} FASTPEFT_REQUIRE_CPP=1 \
  ${PYTHON:-python3} setup.py -q build_ext --inplace
