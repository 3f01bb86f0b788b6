"""Same inputs, same thread count -> bit-identical outputs and gradients, call after call.

The C++ kernels reduce over rows (weight / bias / scale / prefix gradients) in per-chunk
partials with a fixed split of the row blocks (or tasks) into chunks, summed in chunk order;
these tests run each op's backward 10 times on shapes of many blocks with 2 threads and
compare every gradient bit for bit. (The reference backend is ATen; it is checked too.)
"""
import pytest
import torch

import fastpeft
from tests.conftest import _cpp_ok

REPEATS = 10
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _cpp_ok(), reason="C++ backend not built")),
            "reference"]


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _runs(fn, inputs, dy):
    """(output, gradients) of REPEATS identical calls, as lists of tensors."""
    results = []
    for _ in range(REPEATS):
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(dy)
        results.append([y.detach().clone()] + [t.grad.clone() for t in inputs])
    return results


def _assert_bit_identical(results, names):
    first = results[0]
    for i, res in enumerate(results[1:], 1):
        for name, a, b in zip(["out"] + names, first, res):
            assert torch.equal(a, b), (f"{name}: call {i} differs from call 0 (max |diff| "
                                       f"{(a - b).abs().max().item():.3g})")


def _leaves(g, *shapes):
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


# --- adapter: blocks of 16 rows (many per chunk) and the default blocking --------------------------
ADAPTER_CASES = [
    pytest.param(dict(M=4096, d=64, m=16, br=None, p=0.0, scale="float", residual=False), id="M4096-d64-m16"),
    pytest.param(dict(M=2000, d=96, m=16, br="16", p=0.2, scale="vector", residual=False),
                 id="M2000-d96-m16-blocks16-dropout-vector"),
    pytest.param(dict(M=1500, d=64, m=8, br="16", p=0.0, scale="scalar", residual=True),
                 id="M1500-d64-m8-blocks16-scalar-parallel"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADAPTER_CASES)
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
def test_adapter_gradients_bit_identical(two_threads, monkeypatch, backend, case, gemm):
    if backend == "reference" and (gemm == "aten" or case["br"]):
        pytest.skip("blocking / GEMM switches are C++-only")
    if case["br"]:
        monkeypatch.setenv("FASTPEFT_ADAPTER_BR", case["br"])
    if gemm == "aten":
        monkeypatch.setenv("FASTPEFT_CPU_GEMM", "aten")
    M, d, m = case["M"], case["d"], case["m"]
    g = torch.Generator().manual_seed(0)
    x, Wd, bd, Wu, bu = _leaves(g, (M, d), (m, d), (m,), (d, m), (d,))
    inputs = [x, Wd, bd, Wu, bu]
    names = ["x", "down_weight", "down_bias", "up_weight", "up_bias"]
    s = 0.7
    if case["scale"] != "float":
        s = _leaves(g, () if case["scale"] == "scalar" else (d,))[0]
        inputs.append(s)
        names.append("scaling")
    R = None
    if case["residual"]:
        R = _leaves(g, (M, d))[0]
        inputs.append(R)
        names.append("residual")
    dy = torch.randn(M, d, generator=g)
    seed_state = torch.get_rng_state()

    def fn():
        torch.set_rng_state(seed_state)  # the same dropout seed every call
        return fastpeft.adapter(x, Wd, bd, Wu, bu, "gelu", s, R, dropout_p=case["p"], training=case["p"] > 0,
                                backend=backend)

    _assert_bit_identical(_runs(fn, inputs, dy), names)


# --- LoRA: micro-kernel and BLAS ranks, both GEMM paths, dropout, trainable base weights -----------
LORA_CASES = [
    pytest.param(dict(M=2048, K=256, N=192, r=16, p=0.0, blocks=False), id="M2048-K256-N192-r16"),
    pytest.param(dict(M=1000, K=129, N=300, r=16, p=0.1, blocks=True), id="M1000-K129-N300-r16-blocks-dropout"),
    pytest.param(dict(M=1000, K=129, N=65, r=7, p=0.1, blocks=True), id="M1000-K129-N65-r7blas-blocks-dropout"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
def test_lora_gradients_bit_identical(two_threads, monkeypatch, backend, case, gemm):
    if backend == "reference" and (gemm == "aten" or case["blocks"]):
        pytest.skip("blocking / GEMM switches are C++-only")
    if case["blocks"]:
        monkeypatch.setenv("FASTPEFT_LORA_BR", "16")
        monkeypatch.setenv("FASTPEFT_LORA_GB", "48")
    if gemm == "aten":
        monkeypatch.setenv("FASTPEFT_CPU_GEMM", "aten")
    M, K, N, r = case["M"], case["K"], case["N"], case["r"]
    g = torch.Generator().manual_seed(1)
    inputs = _leaves(g, (M, K), (N, K), (N,), (r, K), (N, r))  # base weight and bias trainable too
    x, W, b, A, B = inputs
    dy = torch.randn(M, N, generator=g)
    seed_state = torch.get_rng_state()

    def fn():
        torch.set_rng_state(seed_state)
        return fastpeft.lora_linear(x, W, b, A, B, 0.5, dropout_p=case["p"], training=case["p"] > 0,
                                    backend=backend)

    _assert_bit_identical(_runs(fn, inputs, dy), ["x", "weight", "bias", "lora_A", "lora_B"])


# --- prefix attention: shared prefix (its gradient sums over the batch) and per-sample ------------
PREFIX_CASES = [
    pytest.param((6, 4, 2, 150, 150, 20, 32, 1), id="B6-H4-Hkv2-L150-S150-P20-D32-shared"),
    pytest.param((5, 2, 1, 70, 90, 7, 16, 5), id="B5-H2-Hkv1-L70-S90-P7-D16-perSample"),
    pytest.param((3, 4, 4, 129, 60, 5, 16, 1), id="B3-H4-Hkv4-L129-S60-P5-D16-shared"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", PREFIX_CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefix_attention_gradients_bit_identical(two_threads, backend, shape, causal):
    B, H, Hkv, L, S, P, D, Bp = shape
    g = torch.Generator().manual_seed(2)
    inputs = _leaves(g, (B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D), (Bp, Hkv, P, D), (Bp, Hkv, P, D))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.2  # key padding
    dout = torch.randn(B, H, L, D, generator=g)

    def fn():
        return fastpeft.prefix_attention(*inputs, attn_mask=mask, is_causal=causal, backend=backend)

    _assert_bit_identical(_runs(fn, inputs, dout), ["q", "k", "v", "prefix_k", "prefix_v"])
