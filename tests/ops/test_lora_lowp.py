"""bf16 / fp16 LoRA on the C++ CPU backend: native low-precision GEMMs, fp32 rank-r work.

Judged the way a user judges mixed precision: against the float64 oracle, the fused op's error
is at most 2x the error PyTorch's own eager computation makes in the same dtype (reference
backend), for the output and every gradient, on every configuration the op can choose
(csrc/lora_cpu.cpp: native micro / blocked / whole-M GEMM, brgemm where oneDNN has bf16 micro-kernels,
and "upcast" where the CPU has no native low-precision GEMMs).
"""
import math

import pytest
import torch

import fastpeft
from fastpeft.testing import DTYPE_IDS, assert_as_accurate, cpu_configs
from tests.conftest import _cpp_ok

pytestmark = pytest.mark.skipif(not _cpp_ok(), reason="C++ backend unavailable")
LOWP = [torch.bfloat16, torch.float16]


def _inputs(M, K, N, r, lead=(), noncontig=False, train_weight=False):
    g = torch.Generator().manual_seed(M * 131 + K * 7 + N + r)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, M, 2 * K)[..., ::2] if noncontig else rnd(*lead, M, K)
    return dict(x=x, weight=rnd(N, K) / math.sqrt(K), bias=rnd(N), lora_A=rnd(r, K) / math.sqrt(K),
                lora_B=rnd(N, r) / math.sqrt(r), dy=rnd(*lead, M, N)), train_weight


def _run(data, dtype, backend, p, train_weight):
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    ts = {n: data[n].to(dtype) for n in names}
    for n in names:
        if n in ("x", "lora_A", "lora_B") or train_weight:
            ts[n].requires_grad_()
    torch.manual_seed(7)
    y = fastpeft.lora_linear(ts["x"], ts["weight"], ts["bias"], ts["lora_A"], ts["lora_B"], 1.7,
                             dropout_p=p, training=p > 0, backend=backend)
    y.backward(data["dy"].to(dtype))
    return [y] + [ts[n].grad for n in names if ts[n].requires_grad]


def check_lowp(M, K, N, r, dtype, p=0.0, config=None, monkeypatch=None, **kw):
    data, train_weight = _inputs(M, K, N, r, **kw)
    if config is not None:
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", config)
    got = _run(data, dtype, "cpu", p, train_weight)
    if config is not None:
        monkeypatch.delenv("FASTPEFT_CPU_CONFIG")
    eager = _run(data, dtype, "reference", p, train_weight)
    oracle = _run(data, torch.float64, "reference", p, train_weight)
    names = ["y", "dx"] + (["dW", "db"] if train_weight else []) + ["dA", "dB"]
    for name, a, e, o in zip(names, got, eager, oracle):
        assert a.dtype == dtype and a.shape == o.shape, name
        assert_as_accurate(a, e, o, f"{name} ({DTYPE_IDS[dtype]}, {config or 'auto'})")


def _configs(dtype, r=16):
    x = torch.randn(4, 8, dtype=dtype)
    W, A, B = torch.randn(6, 8, dtype=dtype), torch.randn(r, 8, dtype=dtype), torch.randn(6, r, dtype=dtype)
    return cpu_configs(lambda: torch.ops.fastpeft_cpu.lora_fwd(x, W, None, A, B, 1.0, 0.0, None))


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("M,K,N,r", [(1, 129, 65, 1), (7, 129, 65, 7), (97, 129, 65, 16), (1025, 64, 96, 64),
                                     (33, 40, 50, 100), (65, 200, 33, 200), (0, 8, 6, 2), (5, 8, 0, 2)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_lowp_shapes(dtype, M, K, N, r, p):
    check_lowp(M, K, N, r, dtype, p)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: DTYPE_IDS[d])
def test_lowp_every_config(dtype, monkeypatch):
    configs = _configs(dtype)
    assert any(c.endswith("|micro") for c in configs) and any(c.endswith("|gemm") for c in configs), configs
    for config in configs:
        for p in (0.0, 0.25):
            check_lowp(97, 129, 65, 16, dtype, p, config=config, monkeypatch=monkeypatch)
            check_lowp(33, 64, 48, 7, dtype, p, config=config, monkeypatch=monkeypatch, noncontig=True)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: DTYPE_IDS[d])
def test_lowp_lead_noncontig_trainable_weight(dtype):
    check_lowp(13, 96, 80, 16, dtype, 0.1, lead=(3,), noncontig=True, train_weight=True)
    check_lowp(13, 96, 80, 16, dtype, 0.0, lead=(2, 2), train_weight=True)


def test_lowp_native_on_bf16_cpus():
    """Where the CPU has native bf16 GEMMs (AVX512-BF16 / AMX), bf16 never takes the fp32 copies."""
    caps = torch._C._cpu._get_cpu_capability()
    configs = _configs(torch.bfloat16)
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        assert "upcast" not in configs, configs
    else:
        assert "upcast" in configs, configs
    # Beyond the micro-kernels' ranks: brgemm where oneDNN has bf16 micro-kernels, else upcast.
    wide = _configs(torch.bfloat16, r=300)
    assert ("aten|brgemm" in wide) != ("upcast" in wide), wide


def test_lowp_brgemm_offered_where_onednn_has_kernels():
    """The brgemm configuration is offered exactly where `info` says oneDNN's bf16 micro-kernels run."""
    why = torch.ops.fastpeft_cpu.brgemm_why_not(torch.bfloat16)
    assert ("aten|brgemm" in _configs(torch.bfloat16)) == (why == ""), why
    assert torch.ops.fastpeft_cpu.brgemm_why_not(torch.float32) != ""


@pytest.mark.parametrize("br", ["2", "3", "16"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_lowp_brgemm_small_blocks(monkeypatch, br, p):
    """The brgemm passes with many row blocks, odd block heights (pair-padded VNNI operands),
    odd K / N (zero pad columns), ranks that are not a multiple of the tile depth, and strided x."""
    if torch.ops.fastpeft_cpu.brgemm_why_not(torch.bfloat16) != "":
        pytest.skip(torch.ops.fastpeft_cpu.brgemm_why_not(torch.bfloat16))
    monkeypatch.setenv("FASTPEFT_LORA_BR", br)
    for M, K, N, r, kw in [(37, 129, 65, 7, {}), (20, 64, 33, 40, dict(noncontig=True)), (9, 31, 128, 1, {}),
                           (41, 96, 80, 16, dict(lead=(2,), train_weight=True))]:
        check_lowp(M, K, N, r, torch.bfloat16, p, config="aten|brgemm", monkeypatch=monkeypatch, **kw)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: DTYPE_IDS[d])
def test_lowp_deterministic(dtype):
    data, _ = _inputs(300, 96, 80, 16)
    a = _run(data, dtype, "cpu", 0.1, False)
    b = _run(data, dtype, "cpu", 0.1, False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
