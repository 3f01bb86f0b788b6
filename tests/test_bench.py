"""The benchmark harness: interleaved timing, quantiles, peak memory, one CSV format."""
import csv
import subprocess
import sys

import torch

from fastpeft import bench


def _case():
    a = torch.randn(256, 256)

    def slow():
        return lambda: [a @ a for _ in range(4)]

    def fast():
        return lambda: a @ a

    return bench.Case(op="toy", mode="fwd", shape="n=256", dtype=torch.float32, device=torch.device("cpu"),
                      providers={"slow": slow, "fastpeft": fast}, floor="slow", min_reps=5, budget_s=0.2)


def test_measure_interleaves_and_orders(tmp_path):
    path = tmp_path / "out.csv"
    rows = bench.run_cases([_case()], csv_path=str(path), progress=False)
    by = {r["provider"]: r for r in rows}
    assert by["slow"]["p50_ms"] > by["fastpeft"]["p50_ms"]
    for r in rows:
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["reps"] >= 5
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == bench.COLUMNS and len(got) == 2
    table = bench.format_table(rows)
    assert "| toy | fwd | n=256 |" in table and "×" in table


def test_cpu_peak_memory_sees_allocations():
    mb = bench.peak_memory_mb(lambda: (lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)),
                              torch.device("cpu"))
    assert 3.9 <= mb <= 8.5, mb


def test_bench_cli_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--op", "lora", "--quick",
                          "--csv", str(tmp_path / "b.csv"), "--plot", "", "--budget-scale", "0.05"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen" in out.stdout and "fastpeft" in out.stdout
    with open(tmp_path / "b.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} >= {"frozen", "eager", "fastpeft"}
