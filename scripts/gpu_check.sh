#!/usr/bin/env bash
# The GPU acceptance run in one command, on a machine with a CUDA GPU (issue 11):
#
#   bash scripts/gpu_check.sh [--out DIR] [--name NAME] [--budget SECONDS] [--ops lora,adapter,prefix,vpt]
#                             [--skip-tests] [--skip-bench]
#   bash scripts/gpu_check.sh --dry-run [--out DIR]      # on the CPU: what CI runs
#
# Stages, each under its own timeout and all inside --budget (default 480 s = 8 minutes):
#   1. setup  - use the machine's CUDA torch if it has one; else install torch==2.13.0 first (pip,
#               constraints.txt), then whatever else is missing (triton, numpy, pytest; peft and
#               transformers for the PEFT provider, pytest-xdist to run the tests in parallel).
#   2. tests  - `pytest -m gpu tests/ops tests/modules`: every test that runs a Triton kernel, on the
#               GPU, fp32/fp16/bf16, fwd+bwd (FASTPEFT_TRITON_AUTOTUNE=0: one config per kernel,
#               so the time goes to checking, not to autotuning sweeps).
#   3. bench  - `python -m fastpeft bench --device cuda --dtype bf16 --op OP` for lora (8192x4096x4096
#               r=16 p=0.1 vs frozen / PEFT / torch.compile), adapter (16384x4096 m=64 vs eager,
#               compile and copy bandwidth), prefix, vpt; rows appended to OUT/gpu-NAME.csv.
#   4. summary - scripts/gpu_acceptance.py: the targets against the CSV, into OUT/gpu-NAME.md.
# Files in OUT: gpu-NAME.csv, gpu-NAME.md, gpu-NAME-tests.log, gpu-NAME-bench.log (NAME defaults to
# the GPU's name and the dtype, e.g. nvidia-h200-bf16). Exit status 0 when every stage passed.
#
# --dry-run runs the same stages on the CPU, so the script cannot rot: argument parsing, the
# setup checks (reporting what it would install, installing nothing), the test selection
# (collected, then tests/ops/test_triton_gpu.py run under TRITON_INTERPRET=1 on tiny shapes),
# the benchmark CLI on the CPU with --quick (every op in one process), and the summary; it prints
# the GPU mode's commands as its plan. OUT defaults to bench_out/gpu-check-dryrun.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0

DRY=0 OUT="" NAME="" BUDGET=480 RUN_TESTS=1 RUN_BENCH=1 OPS="lora,adapter,prefix,vpt"
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; echo "(stages and files: the comment at the top of $0)"; }
need() { [ "$2" -ge 2 ] || { echo "gpu_check: $1 needs $3" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) need "$1" $# "a directory"; OUT=$2; shift ;;
    --name) need "$1" $# "a value"; NAME=$2; shift ;;
    --budget) need "$1" $# "seconds"; BUDGET=$2; shift ;;
    --ops) need "$1" $# "a comma list"; OPS=$2; shift ;;
    --skip-tests) RUN_TESTS=0 ;;
    --skip-bench) RUN_BENCH=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

START=$SECONDS
declare -a SUMMARY=()
FAILED=0
say() { printf '[gpu_check %3ds] %s\n' "$((SECONDS - START))" "$*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
record() { SUMMARY+=("$1|$2|$3"); [ "$2" = "ok" ] || [ "$2" = "skipped" ] || FAILED=1; }

# run_stage NAME LOGFILE MAX_SECONDS CMD...: one stage under min(MAX_SECONDS, time left - 5 s)
run_stage() {
  local name=$1 log=$2 max=$3; shift 3
  local t; t=$(left); t=$((t - 5)); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 10 ]; then
    say "$name: SKIPPED (budget spent)"; record "$name" "skipped (budget spent)" 0; return 1
  fi
  say "$name: $* (timeout ${t}s)"
  local t0=$SECONDS rc
  { echo "### $name: $*"; } >>"$log"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then record "$name" ok "$dt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" "TIMEOUT after ${t}s" "$dt"
  else record "$name" "FAILED (exit $rc)" "$dt"; fi
  return "$rc"
}

# have MODULE: installed (found without importing it: importing torch or transformers takes seconds)
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" >/dev/null 2>&1; }
pip_install() {  # pip_install SECONDS SPEC...: with constraints.txt when the repo has one
  local t=$1; shift
  local c=(); [ -f constraints.txt ] && c=(-c constraints.txt)
  if [ "$DRY" = 1 ]; then say "setup: would run: $PY -m pip install -q ${c[*]} $*"; return 0; fi
  say "setup: $PY -m pip install -q ${c[*]} $*"
  timeout -k 5 "$t" "$PY" -m pip install -q "${c[@]}" "$@"
}

TESTS_S=150  # the GPU test stage's limit (s)

# ---- 1. setup -------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
[ -z "$OUT" ] && { if [ "$DRY" = 1 ]; then OUT=bench_out/gpu-check-dryrun; else OUT=benchmarks/results; fi; }
setup_ok=1
cuda_torch() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
if have torch && cuda_torch; then
  say "setup: using the CUDA torch already installed: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')" \
      "(not replaced by torch==$TORCH_VERSION: a working CUDA build stays)"
elif [ "$DRY" = 1 ]; then
  say "setup: no CUDA torch here (dry run): on a GPU machine without one this installs torch==$TORCH_VERSION first"
  pip_install 600 "torch==$TORCH_VERSION"
else
  # torch first, so nothing installed after it pulls another build; PyPI's Linux wheel is the CUDA one
  pip_install 400 "torch==$TORCH_VERSION" || true
  if ! cuda_torch; then
    say "setup: FAILED: torch does not see a CUDA device (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"
    setup_ok=0
  fi
fi
for mod in triton numpy pytest; do
  have "$mod" || pip_install 200 "$mod" || { say "setup: cannot install $mod"; setup_ok=0; }
done
have peft || pip_install 200 peft transformers || say "setup: no peft: the LoRA bench runs without the PEFT provider"
have xdist || pip_install 100 pytest-xdist || say "setup: no pytest-xdist: the tests run in one process"

if [ -z "$NAME" ]; then
  if [ "$DRY" = 1 ]; then NAME=dryrun-cpu
  else
    NAME=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" \
           2>/dev/null || echo cuda)-bf16
  fi
fi
mkdir -p "$OUT"
CSV="$OUT/gpu-$NAME.csv" MD="$OUT/gpu-$NAME.md" TLOG="$OUT/gpu-$NAME-tests.log" BLOG="$OUT/gpu-$NAME-bench.log"
rm -f "$CSV" "$TLOG" "$BLOG"
say "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU)' || echo GPU); budget ${BUDGET}s; out: $CSV, $MD, $TLOG, $BLOG"
say "plan (GPU mode): tests: FASTPEFT_TRITON_AUTOTUNE=0 $PY -m pytest -m gpu tests/ops tests/modules [-n N], ${TESTS_S}s"
say "plan (GPU mode): bench: $PY -m fastpeft bench --device cuda --dtype bf16 --op OP --budget-scale 0.5" \
    "--csv benchmarks/results/gpu-<gpu>-bf16.csv for OP in $OPS"
"$PY" - <<'EOF' 2>&1 | tee -a "$TLOG"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"triton not importable: {exc}")
EOF
if [ "$setup_ok" = 1 ]; then record setup ok $((SECONDS - START)); else record setup FAILED $((SECONDS - START)); fi

# ---- 2. tests -------------------------------------------------------------------------------------
SELECT=(-m gpu tests/ops tests/modules)
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
if [ "$RUN_TESTS" = 0 ]; then record tests skipped 0
elif [ "$setup_ok" = 0 ]; then record tests "skipped (setup failed)" 0
elif [ "$DRY" = 1 ]; then
  run_stage "tests: collect the GPU selection" "$TLOG" 120 env TRITON_INTERPRET=1 "${PYTEST[@]}" --collect-only "${SELECT[@]}"
  run_stage "tests: every kernel fwd+bwd (interpreter)" "$TLOG" 300 env TRITON_INTERPRET=1 \
    "${PYTEST[@]}" -m gpu tests/ops/test_triton_gpu.py
else
  XDIST=()
  if have xdist; then
    n=$(( $(nproc) / 2 )); [ "$n" -gt 8 ] && n=8; [ "$n" -ge 2 ] && XDIST=(-n "$n")
  fi
  # FASTPEFT_NO_JIT=1: the GPU tests need no C++ backend, so none is compiled on first use
  run_stage "tests: pytest -m gpu on CUDA" "$TLOG" "$TESTS_S" env FASTPEFT_TRITON_AUTOTUNE=0 FASTPEFT_NO_JIT=1 \
    "${PYTEST[@]}" "${XDIST[@]}" "${SELECT[@]}"
fi

# ---- 3. benchmarks --------------------------------------------------------------------------------
# per-op limits (s) that, with the tests' 150 s and setup, fit the default 8 minutes; a case's rows
# reach the CSV as soon as it is timed, so an op stopped at its limit keeps its finished cases
declare -A MAX_S=([lora]=110 [adapter]=60 [prefix]=90 [vpt]=50 [encoder]=90)
if [ "$RUN_BENCH" = 0 ]; then record bench skipped 0
elif [ "$setup_ok" = 0 ]; then record bench "skipped (setup failed)" 0
else
  if [ "$DRY" = 1 ]; then  # the same CLI, every op in one process (CI time), tiny shapes
    run_stage "bench: $OPS (CPU, --quick)" "$BLOG" 400 "$PY" -m fastpeft bench --device cpu --quick --op "$OPS" \
      --budget-scale 0.05 --csv "$CSV" --plot "" --markdown ""
  else
    IFS=, read -r -a ops <<<"$OPS"
    for op in "${ops[@]}"; do
      run_stage "bench: $op" "$BLOG" "${MAX_S[$op]:-90}" "$PY" -m fastpeft bench --device "$DEVICE" --dtype bf16 \
        --op "$op" --budget-scale 0.5 --csv "$CSV" --plot "" --markdown ""
    done
  fi
fi

# ---- 4. summary -----------------------------------------------------------------------------------
[ -s "$CSV" ] || record summary "FAILED (no benchmark rows in $CSV)" 0
{
  echo "# GPU check: $NAME ($([ "$DRY" = 1 ] && echo 'dry run on the CPU: the figures mean nothing' || echo "$DEVICE")), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|---|"
  for s in "${SUMMARY[@]}"; do IFS='|' read -r a b c <<<"$s"; echo "| $a | $b | $c |"; done
  echo
  if [ -s "$CSV" ]; then "$PY" scripts/gpu_acceptance.py "$CSV"; else echo "(no benchmark rows)"; fi
  echo
  echo "total $((SECONDS - START))s of the ${BUDGET}s budget"
} >"$MD" 2>&1
cat "$MD"
say "done in $((SECONDS - START))s: $([ "$FAILED" = 0 ] && echo 'every stage passed' || echo 'some stage FAILED (see above)')"
exit "$FAILED"
