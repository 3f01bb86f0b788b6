"""scripts/gpu_check.sh: its --dry-run (what CI can run without a GPU) and its argument parsing.

The dry run goes through every stage of the GPU acceptance run on the CPU: setup checks (nothing
installed), the ``-m gpu`` test selection (collected, and tests/ops/test_triton_gpu.py run under
the Triton interpreter), the benchmark CLI with --quick, and the summary of
scripts/gpu_acceptance.py, writing the same files the GPU run writes.
"""
import csv
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it per stage
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("args,msg", [(["--bogus"], "unknown argument '--bogus'"),
                                      (["--budget", "8min"], "--budget takes whole seconds"),
                                      (["--out"], "--out needs a directory")])
def test_bad_arguments_are_refused(args, msg):
    out = _run(*args)
    assert out.returncode == 2 and msg in out.stderr, out.stderr


def test_help():
    out = _run("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout


def test_dry_run(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path), timeout=1500)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    name = "gpu-dryrun-cpu"
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(f"{name}{s}" for s in (".csv", ".md", "-tests.log", "-bench.log")), files
    # the plan names the GPU mode's commands and where its CSV goes
    assert "pytest -m gpu tests/ops tests/modules" in log
    assert "bench --device cuda --dtype bf16" in log and "benchmarks/results/gpu-" in log
    # tests: the selection collected, and the interpreter run of every kernel passed
    tests_log = (tmp_path / f"{name}-tests.log").read_text()
    assert "tests/ops/test_triton_gpu.py" in tests_log and " passed" in tests_log
    # bench: rows of every op, in the harness's CSV format
    with open(tmp_path / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} >= {"lora", "adapter", "prefix", "vpt_deep_train_step"}
    assert {r["provider"] for r in rows if r["op"] == "adapter"} >= {"copy", "eager", "fastpeft"}
    # summary: every stage ok, and the acceptance table
    md = (tmp_path / f"{name}.md").read_text()
    stages = [line for line in md.splitlines() if line.startswith("| setup") or line.startswith("| tests")
              or line.startswith("| bench")]
    assert len(stages) == 4 and all("| ok |" in s for s in stages), stages
    assert "fraction of copy bandwidth" in md and "HF PEFT time / fastpeft time" in md
