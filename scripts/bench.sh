#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: every benchmark on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
${PYTHON:-python3} -m fastpeft bench "$@"
