"""Backend selection: one place, overridable, and able to say why a backend is not used."""
import os
import subprocess
import sys

import pytest
import torch

from fastpeft import _backend


def test_backends_report_has_reasons():
    rep = _backend.backends()
    assert set(rep) == {"triton", "cpu", "reference"}
    assert rep["reference"]["available"]
    for name, st in rep.items():
        assert isinstance(st["reason"], str) and st["reason"]
        for fam, why in st["ops"].items():
            assert why == "ok" or len(why) > 10, (name, fam, why)


def test_automatic_choice_on_cpu_prefers_cpp_then_reference():
    for fam in _backend.FAMILIES:
        chosen = _backend.select_backend(fam, torch.device("cpu"))
        expected = "cpu" if _backend.why_not("cpu", fam, torch.device("cpu")) is None else "reference"
        assert chosen == expected


def test_triton_never_chosen_automatically_for_cpu_tensors():
    assert _backend.select_backend("lora", torch.device("cpu")) != "triton"


def test_explicit_and_env_override(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert _backend.select_backend("lora", torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert _backend.select_backend("lora", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match=r"C\+\+ backend runs CPU tensors only"):
        _backend.select_backend("lora", torch.device("meta"), "cpu")
    with pytest.raises(RuntimeError, match="unknown backend 'cuda'"):
        _backend.select_backend("lora", torch.device("cpu"), "cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.why_not("triton", "lora", torch.device("cpu"))
    assert why is not None and ("TRITON_INTERPRET" in why or "triton not importable" in why)


def test_info_cli_runs():
    out = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("triton", "cpu", "reference", "automatic choice on cpu"):
        assert word in out.stdout
    # The CPU it runs on and the GEMM path per dtype (speed figures are claims about a CPU).
    from fastpeft import _cpuinfo

    assert f"CPU: {_cpuinfo.cpu_model()} ({_cpuinfo.isa()})" in out.stdout
    if _backend.why_not("cpu", "lora", torch.device("cpu")) is None:
        assert "GEMM Float: aten ok; onednn " in out.stdout


def _isa_run(env_extra, code):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_onednn_refused_isa_falls_back_to_aten():
    """ONEDNN_MAX_CPU_ISA=AVX2 (as on an AVX2-only x86): oneDNN's fp32 matmul refuses to run, the C++
    ops say so in `info` and run every op on ATen's GEMMs, matching the reference."""
    if _backend.why_not("cpu", "lora", torch.device("cpu")) is not None:
        pytest.skip("C++ backend not available")
    code = """
import torch, fastpeft
from fastpeft import _backend
assert _backend._cpp_status() is None, _backend._cpp_status()  # loads the C++ ops
print(torch.ops.fastpeft_cpu.gemm_libs()[0])
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 96, generator=g, requires_grad=True)
W, b = torch.randn(80, 96, generator=g) * 96 ** -0.5, torch.randn(80, generator=g)
A = (torch.randn(16, 96, generator=g) * 96 ** -0.5).requires_grad_()
B = (torch.randn(80, 16, generator=g) * 0.25).requires_grad_()
Wd, Wu = torch.randn(64, 96, generator=g) * 96 ** -0.5, torch.randn(96, 64, generator=g) * 0.125
q = torch.randn(2, 3, 5, 8, generator=g); pk = torch.randn(1, 3, 4, 8, generator=g)
outs = {}
for be in ("cpu", "reference"):
    torch.manual_seed(1)
    y = fastpeft.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, training=True, backend=be)
    outs[be] = [y] + list(torch.autograd.grad(y.square().sum(), (x, A, B)))
    ya = fastpeft.adapter(x, Wd, None, Wu, None, "gelu", 0.5, backend=be)
    outs[be].append(ya)
    outs[be].append(fastpeft.prefix_attention(q, q, q, pk, pk, backend=be))
for a, r in zip(outs["cpu"], outs["reference"]):
    torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
print("OK")
"""
    out = _isa_run({"ONEDNN_MAX_CPU_ISA": "AVX2"}, code)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = out.stdout.strip().splitlines()[0], out.stdout.strip().splitlines()[-1]
    assert last == "OK"
    if "onednn ok" not in first:  # this CPU's oneDNN refuses fp32 matmul below AVX-512 (as torch 2.13's does)
        assert "refused this CPU" in first, first


def test_mkldnn_flag_is_respected():
    """torch.backends.mkldnn.flags(enabled=False) takes oneDNN out of the choice; asking for it then
    is an error that says why, not a silent fallback."""
    if _backend.why_not("cpu", "lora", torch.device("cpu")) is not None:
        pytest.skip("C++ backend not available")
    import fastpeft

    x, W = torch.randn(8, 16), torch.randn(12, 16)
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    with torch.backends.mkldnn.flags(enabled=False):
        assert "torch.backends.mkldnn is disabled" in torch.ops.fastpeft_cpu.gemm_libs()[0]
        y = fastpeft.lora_linear(x, W, None, A, B, 1.0, backend="cpu")
        torch.testing.assert_close(y, x @ W.t() + (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)
        os.environ["FASTPEFT_CPU_GEMM"] = "onednn"
        try:
            with pytest.raises(RuntimeError, match="FASTPEFT_CPU_GEMM=onednn, but oneDNN cannot run here"):
                fastpeft.lora_linear(x, W, None, A, B, 1.0, backend="cpu")
        finally:
            del os.environ["FASTPEFT_CPU_GEMM"]


def test_import_is_lazy_and_never_fails():
    code = "import fastpeft, sys; print('fastpeft.ops.lora' in sys.modules); print(fastpeft.lora_linear.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "lora_linear"]
