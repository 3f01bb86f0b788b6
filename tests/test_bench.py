"""The benchmark harness: interleaved timing, quantiles, peak memory, one CSV format."""
import csv
import subprocess
import sys

import pytest
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
    assert "THP_MEM_ALLOC_ENABLE=1" in out.stdout  # re-ran itself under the bench's allocator setting


@pytest.mark.skipif(not bench.onednn_ok("cpu", torch.float32), reason="torch without oneDNN")
def test_onednn_linear_floor_matches_f_linear():
    """The frozen_onednn / eager_onednn providers compute the same values and gradients as F.linear."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(*s, generator=g, requires_grad=True) for s in ((37, 29), (13, 29), (13,))]
    dy = torch.randn(37, 13, generator=g)
    y = bench.onednn_linear(*ts)
    y.backward(dy)
    got = [t.grad.clone() for t in ts]
    ref = [t.detach().clone().requires_grad_() for t in ts]
    y_ref = torch.nn.functional.linear(*ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r.grad)
