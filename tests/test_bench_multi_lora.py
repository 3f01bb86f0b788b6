"""``python -m fastpeft bench --op multi_lora``: the providers do the same work (equal outputs
and gradients), and the CLI writes the shared CSV format."""
import csv
import subprocess
import sys

import pytest
import torch

from fastpeft.bench import multi_lora as ml


@pytest.mark.parametrize("kind", ml.ASSIGN)
def test_providers_agree(kind, monkeypatch):
    monkeypatch.setattr(ml, "QUICK_PLAN", dict(samples=5, tokens=3, K=24, N=20, adapters=(4,)))
    for mode in ml.MODES:
        provs = ml._providers(ml.QUICK_PLAN, 4, kind, mode, torch.float32, torch.device("cpu"))
        if mode == "fwd":
            outs = {name: prep()() for name, prep in provs.items()}
            assert "peft" in outs  # peft is installed here
            for name in ("peft", "loop"):
                torch.testing.assert_close(outs[name], outs["fastpeft"], rtol=1e-5, atol=1e-5, msg=name)
            assert not torch.allclose(outs["fastpeft"], outs["frozen"])
        else:
            assert set(provs) == {"frozen", "single", "loop", "fastpeft"}  # PEFT: forward only


def test_assignment():
    assert ml.assignment(16, 8, "uniform").bincount(minlength=8).tolist() == [2] * 8
    z = ml.assignment(16, 8, "zipf")
    assert z.shape == (16,) and z.min() >= 0 and z.max() < 8
    assert z.bincount(minlength=8)[0] >= z.bincount(minlength=8)[7]  # skewed to the first adapters


def test_bench_cli_quick_multi_lora(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--op", "multi_lora", "--quick",
                          "--csv", str(tmp_path / "b.csv"), "--plot", "", "--budget-scale", "0.05"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "b.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"multi_lora"}
    assert {r["provider"] for r in rows} == {"frozen", "single", "peft", "loop", "fastpeft"}
    assert {r["mode"] for r in rows} == {"fwd", "full"}
