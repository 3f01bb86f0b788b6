"""fastpeft.dora_linear on every backend vs the float64 autograd oracle (fastpeft.reference.dora,
written as HF PEFT computes DoRA; tests/api/test_dora_peft.py checks the oracle against PEFT)."""
import math

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft.reference.dora import dora_linear_reference, dora_norm, weight_sq_norm
from fastpeft.testing import DTYPE_IDS, assert_close, upcast
from tests.conftest import _cpp_ok, backend_params, device_for

BACKENDS = backend_params("dora")
NAMES = ["x", "weight", "bias", "lora_A", "lora_B", "magnitude"]


def make(M, K, N, r, dtype, device, *, lead=(), bias=True, train_weight=False, noncontig=False, zero_mag=0):
    """DoRA inputs: x, A, B, magnitude require grad; W, b only with ``train_weight``. The magnitude
    starts near ‖W + s·B·A‖ (as PEFT initialises it) times a random factor, so g ≠ 1; ``zero_mag``
    rows get magnitude exactly 0."""
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + r)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, M, 2 * K) if noncontig else rnd(*lead, M, K)
    W = rnd(N, K) / math.sqrt(K)
    b = rnd(N) if bias else None
    A = rnd(r, K) / math.sqrt(K)
    B = rnd(N, r) / math.sqrt(r)
    m = W.norm(dim=1) * (1 + 0.3 * rnd(N))
    m[:zero_mag] = 0
    ts = [x, W, b, A, B, m]
    grads = (True, train_weight, train_weight, True, True, True)
    out = [None if t is None else t.to(device=device, dtype=dtype) for t in ts]
    if noncontig:
        out[0] = out[0][..., ::2]  # a strided view (every other column)
    return [None if t is None else t.requires_grad_(gr) for t, gr in zip(out, grads)]


def check(backend, M, K, N, r, dtype, p=0.0, *, scaling=0.5, lead=(), bias=True, train_weight=False,
          noncontig=False, zero_mag=0, scale_tol=1.0):
    device = device_for(backend)
    ts = make(M, K, N, r, dtype, device, lead=lead, bias=bias, train_weight=train_weight, noncontig=noncontig,
              zero_mag=zero_mag)
    if noncontig:
        assert not ts[0].is_contiguous()
    torch.manual_seed(123)
    y = fastpeft.dora_linear(*ts, scaling, dropout_p=p, training=p > 0, backend=backend)
    torch.manual_seed(123)
    seed = _dropout.new_seed(p > 0)
    ref_in = upcast(ts)
    y_ref = dora_linear_reference(*ref_in, scaling, p, seed)
    assert y.dtype == dtype and y.shape == (*lead, M, N) and y.device == ts[0].device
    assert_close(y, y_ref, dtype, "y", scale=scale_tol)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.backward(dy.to(device=device, dtype=dtype))
    y_ref.backward(dy.to(device))
    for name, t, t_ref in zip(NAMES, ts, ref_in):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name} should get no gradient"
            continue
        assert t.grad is not None, f"{name} got no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}", scale=scale_tol)


SHAPES = [pytest.param(M, K, N, r, id=f"M{M}-K{K}-N{N}-r{r}")
          for (M, K, N, r) in [(1, 129, 65, 1), (7, 129, 65, 7), (97, 129, 65, 16), (33, 64, 48, 64)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_shapes_fp(backend, M, K, N, r, dtype, p):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels are fp32/fp16/bf16")
    check(backend, M, K, N, r, dtype, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_half(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("triton's interpreter returns garbage for bf16 tl.dot; checked on GPU")
    check(backend, 97, 129, 65, 16, dtype)
    check(backend, 33, 129, 65, 7, dtype, p=0.25)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_large_rows(backend):
    check(backend, 1025, 129, 65, 16, torch.float32)
    check(backend, 1025, 129, 65, 64, torch.float32, p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dropout_and_bias(backend, p, bias):
    check(backend, 33, 129, 65, 7, torch.float32, bias=bias, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous(backend):
    check(backend, 7, 129, 65, 16, torch.float32, lead=(2, 3))
    check(backend, 7, 129, 65, 16, torch.float32, lead=(3,), noncontig=True, p=0.2)
    check(backend, 7, 129, 65, 16, torch.float32, lead=(3,), noncontig=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_full_finetune_weight_grads(backend, bias, p):
    """W and b trainable too (the norm stays detached, as in PEFT)."""
    check(backend, 33, 129, 65, 7, torch.float32, bias=bias, train_weight=True, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_zero_magnitude_rows(backend, p):
    """m_n = 0: the magnitude gradient cannot come from (y - b)/g there; it is recomputed."""
    check(backend, 33, 64, 48, 8, torch.float64 if backend != "triton" else torch.float32, p=p, zero_mag=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_256(backend):
    if backend == "triton" and not torch.cuda.is_available():
        check(backend, 17, 64, 32, 256, torch.float32)
    else:
        check(backend, 65, 300, 129, 256, torch.float32)


def test_norm_without_nxk_matches_direct():
    """‖W + s·B·A‖ from ‖W‖², W·Aᵀ and A·Aᵀ equals the direct row norm (PEFT's computation)."""
    g = torch.Generator().manual_seed(1)
    W, A, B = (torch.randn(70, 129, generator=g, dtype=torch.float64), torch.randn(5, 129, generator=g,
               dtype=torch.float64), torch.randn(70, 5, generator=g, dtype=torch.float64))
    direct = torch.linalg.norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(dora_norm(W, weight_sq_norm(W), A, B, 0.7), direct, rtol=1e-12, atol=1e-12)


def test_weight_sq_cache_follows_weight_version():
    from fastpeft.ops.dora import cached_weight_sq

    W = torch.randn(6, 5)
    a = cached_weight_sq(W)
    assert cached_weight_sq(W) is a  # cached
    with torch.no_grad():
        W.mul_(2)  # an optimizer step bumps the version
    b = cached_weight_sq(W)
    torch.testing.assert_close(b, (W * W).sum(1))
    # a transposed view (GPT-2 Conv1D) is a new object per call: cached on the storage's owner
    c = cached_weight_sq(W.t())
    assert cached_weight_sq(W.t()) is c
    torch.testing.assert_close(c, (W * W).sum(0))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_cpu_and_reference_agree_bitwise_determinism(backend):
    """Repeated calls with the same seed give bit-identical results (fixed chunking)."""
    ts = make(300, 64, 80, 8, torch.float32, "cpu")
    outs = []
    for _ in range(3):
        for t in ts:
            if t is not None:
                t.grad = None
        torch.manual_seed(3)
        y = fastpeft.dora_linear(*ts, 2.0, dropout_p=0.1, training=True, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [t.grad.clone() for t in ts if t is not None and t.grad is not None])
    for o in outs[1:]:
        for a, c in zip(outs[0], o):
            assert torch.equal(a, c)


def test_saved_tensors_no_extra_mxn_without_dropout():
    """Without dropout nothing M×N is saved but the output itself (the magnitude gradient comes
    from y); with dropout one M×N tensor v = drop(x)·Wᵀ is kept. No M×K mask or dropped x."""
    x = torch.randn(64, 96, requires_grad=True)
    W, A, B = torch.randn(80, 96), torch.randn(4, 96, requires_grad=True), torch.randn(80, 4, requires_grad=True)
    m = W.norm(dim=1).requires_grad_()
    for p, n_mn in ((0.0, 0), (0.5, 1)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fastpeft.dora_linear(x, W, None, A, B, m, 2.0, dropout_p=p, training=True)
        mn = [t for t in saved if t.shape == (64, 80) and t.data_ptr() != y.data_ptr()]
        assert len(mn) == n_mn, [tuple(t.shape) for t in saved]
        assert all(t.data_ptr() == x.data_ptr() for t in saved if tuple(t.shape) == (64, 96))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
def test_gradcheck(backend, p):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, W, b, A, B = mk(2, 5, 11), mk(9, 11), mk(9), mk(3, 11), mk(9, 3)
    m = (W.detach().norm(dim=1) * 1.2).requires_grad_()

    def f(x, W, b, A, B, m):
        torch.manual_seed(1234)
        return fastpeft.dora_linear(x, W, b, A, B, m, 0.7, dropout_p=p, training=p > 0, backend=backend)

    # The norm is detached (PEFT, DoRA paper §4.3), so the analytic gradients of W, A and B leave out
    # its dependence on them and finite differences would not: gradcheck x, b and m here; W, A, B
    # are compared with the oracle's autograd gradients in the tests above.
    assert torch.autograd.gradcheck(lambda x, b, m: f(x, W.detach(), b, A.detach(), B.detach(), m), (x, b, m))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_opcheck(backend):
    from fastpeft.ops.dora import cached_weight_sq

    x, W, b = torch.randn(7, 12), torch.randn(10, 12), torch.randn(10)
    A, B, m = torch.randn(3, 12), torch.randn(10, 3), torch.rand(10) + 0.5
    w_sq = cached_weight_sq(W)
    seed = _dropout.new_seed(True)
    for args in ((x, W, b, A, B, m, w_sq, 0.5, 0.2, seed, backend), (x, W, None, A, B, m, w_sq, 0.5, 0.0, None, backend)):
        torch.library.opcheck(torch.ops.fastpeft.dora_fwd.default, args)
    dy, t, norm = torch.randn(7, 10), torch.randn(7, 3), torch.rand(10) + 1
    yv = torch.randn(7, 10)
    for need in [(True, True, True, True), (True, False, False, True), (False, False, False, False)]:
        for p, sd in ((0.2, seed), (0.0, None)):
            torch.library.opcheck(torch.ops.fastpeft.dora_bwd.default,
                                  (dy, x, W, b, A, B, m, t, norm, yv, 0.5, p, sd, *need, backend))


def test_torch_compile_fullgraph():
    layer = fastpeft.LoRALinear(torch.nn.Linear(32, 24), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    model = torch.nn.Sequential(layer, torch.nn.GELU(), torch.nn.Linear(24, 5))
    x = torch.randn(3, 6, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad is not None


def test_autocast_cpu_bf16():
    x, W, b = torch.randn(9, 32), torch.randn(16, 32), torch.randn(16)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    m = W.norm(dim=1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.dora_linear(x, W, b, A, B, m, 0.5)
    assert y.dtype == torch.bfloat16
    ref = dora_linear_reference(*upcast([x, W, b, A, B, m]), 0.5)
    assert_close(y, ref, torch.bfloat16, "y")
    y.float().sum().backward()
    assert m.grad is not None and m.grad.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(6, 9)), r"weight: expected shape \(N, 8\)"),
    (dict(magnitude=torch.randn(5)), r"magnitude: expected shape \(6,\), got \(5,\)"),
    (dict(magnitude=torch.randn(6, dtype=torch.float64)), r"magnitude: expected dtype torch.float32"),
    (dict(lora_B=torch.randn(6, 3)), r"lora_B: expected shape \(6, 2\), got \(6, 3\)"),
    (dict(dropout_p=1.0), r"dropout_p"),
    (dict(scaling=float("nan")), r"scaling"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(6, 2), magnitude=torch.rand(6), scaling=1.0, dropout_p=0.1, training=True)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fastpeft.dora_linear(**args)


@pytest.mark.parametrize("lib", ["aten", "onednn"])
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "after-pass"])
def test_cpu_configs_with_dropout(monkeypatch, lib, blocked):
    """Every configuration of the C++ dropout pass (csrc/dora_cpu.cpp, chosen by tune.h), forced by
    name: the forward runs its GEMMs per row block ("<lib>+blocked"); the backward per row block or
    as multi-threaded GEMMs around the pass ("<lib>")."""
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    if lib == "onednn" and "onednn ok" not in torch.ops.fastpeft_cpu.gemm_libs()[0]:
        pytest.skip("oneDNN cannot run here")
    monkeypatch.setenv("FASTPEFT_LORA_BR", "5")  # rank-pass sub-blocks with ragged tails
    for M, N, kw in ((600, 1100, {}), (97, 65, dict(noncontig=True, train_weight=True))):
        ts = make(M, 129, N, 16 if M == 600 else 7, torch.float32, "cpu", **kw)
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", f"{lib}+blocked")
        torch.manual_seed(1)
        y = fastpeft.dora_linear(*ts, 0.5, dropout_p=0.2, training=True, backend="cpu")
        torch.manual_seed(1)
        seed = _dropout.new_seed(True)
        ref_in = upcast(ts)
        y_ref = dora_linear_reference(*ref_in, 0.5, 0.2, seed)
        assert_close(y, y_ref, torch.float32, "y")
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", f"{lib}+blocked" if blocked else lib)
        dy = torch.randn(y.shape, dtype=torch.float64)
        y.backward(dy.float())
        y_ref.backward(dy)
        for name, t, t_ref in zip(NAMES, ts, ref_in):
            if t is not None and t.requires_grad:
                assert_close(t.grad, t_ref.grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_empty_batch(backend, p):
    """M = 0 rows: empty output, zero gradients for the factors and the magnitude."""
    device = device_for(backend)
    x = torch.randn(0, 8, device=device, requires_grad=True)
    W, b = torch.randn(6, 8, device=device), torch.randn(6, device=device)
    A = torch.randn(2, 8, device=device, requires_grad=True)
    B = torch.randn(6, 2, device=device, requires_grad=True)
    m = (torch.rand(6, device=device) + 0.5).requires_grad_()
    y = fastpeft.dora_linear(x, W, b, A, B, m, 1.0, p, training=True, backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    for t in (A, B, m):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert x.grad.shape == (0, 8)


def test_layer_under_autocast_takes_fused_path(monkeypatch):
    """LoRALinear(use_dora=True) with fp32 weights under bf16 autocast: the fused op (it casts the
    magnitude too) and fp32 gradients for the fp32 DoRA parameters."""
    import fastpeft.modules.lora as mod

    calls = []
    real = mod.dora_linear
    monkeypatch.setattr(mod, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = fastpeft.LoRALinear(torch.nn.Linear(32, 16), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert calls and y.dtype == torch.bfloat16
    ref = layer.float()(x)  # fp32, unfused-equivalent oracle through the same layer
    assert_close(y, ref, torch.bfloat16, "y")
    y.float().sum().backward()
    m = layer.lora_magnitude_vector["default"].weight
    assert m.grad is not None and m.grad.dtype == torch.float32
