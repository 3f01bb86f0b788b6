"""fastpeft.lora_linear on every backend vs the autograd oracle (fastpeft.reference.lora)."""
import math

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft.reference.lora import lora_linear_reference
from fastpeft.testing import DTYPE_IDS, assert_close, upcast
from tests.conftest import _cpp_ok, backend_params, device_for

BACKENDS = backend_params("lora")
NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


def make(M, K, N, r, dtype, device, *, lead=(), bias=True, train_weight=False, noncontig=False, x_grad=True):
    """LoRA inputs on ``device``: x, A, B require grad (x unless ``x_grad`` is False); W, b only
    with ``train_weight``; ``noncontig`` makes x a strided view (every other column)."""
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + r)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if noncontig:
        x = rnd(*lead, M, 2 * K).to(device=device, dtype=dtype)[..., ::2]
    else:
        x = rnd(*lead, M, K).to(device=device, dtype=dtype)
    W = (rnd(N, K) / math.sqrt(K)).to(device=device, dtype=dtype)
    b = rnd(N).to(device=device, dtype=dtype) if bias else None
    A = (rnd(r, K) / math.sqrt(K)).to(device=device, dtype=dtype)
    B = (rnd(N, r) / math.sqrt(r)).to(device=device, dtype=dtype)
    return [None if t is None else t.requires_grad_(grad)
            for t, grad in ((x, x_grad), (W, train_weight), (b, train_weight), (A, True), (B, True))]


def check(backend, M, K, N, r, dtype, p=0.0, *, scaling=0.5, lead=(), bias=True, train_weight=False,
          noncontig=False, x_grad=True, scale_tol=1.0):
    """fastpeft.lora_linear on ``backend`` vs the float64 oracle: the output and every gradient."""
    device = device_for(backend)
    ts = make(M, K, N, r, dtype, device, lead=lead, bias=bias, train_weight=train_weight, noncontig=noncontig,
              x_grad=x_grad)
    if noncontig:
        assert not ts[0].is_contiguous()
    torch.manual_seed(123)
    y = fastpeft.lora_linear(*ts, scaling, dropout_p=p, training=p > 0, backend=backend)
    torch.manual_seed(123)  # the same seed the op drew
    seed = _dropout.new_seed(p > 0)
    ref_in = upcast(ts)
    y_ref = lora_linear_reference(*ref_in, scaling, p, seed)
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


# --- shapes and dtypes -------------------------------------------------------------------
SHAPES = [pytest.param(M, K, N, r, id=f"M{M}-K{K}-N{N}-r{r}")
          for (M, K, N, r) in [(1, 129, 65, 1), (7, 129, 65, 7), (97, 129, 65, 16), (33, 64, 48, 64)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
def test_shapes_fp(backend, M, K, N, r, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels are fp32/fp16/bf16")
    check(backend, M, K, N, r, dtype)


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


# --- C++ blocking, GEMM libraries and configurations ---------------------------------------
PLACEMENTS = ["aten", "aten+blocked", "onednn", "onednn+blocked"]


@pytest.mark.parametrize("rank_impl", ["micro", "blas"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("r", [16, 8, 7], ids=["r16", "r8", "r7"])
def test_cpu_configs_small_blocks(monkeypatch, placement, rank_impl, r):
    """Every configuration the C++ op can choose at run time (csrc/tune.h), forced by name
    ("<placement>|<rank products>"), with many row blocks and column tiles with ragged tails.
    r = 16 / 8 fill whole vectors (zmm / ymm micro-kernels); r = 7 has only the BLAS rank path,
    and forcing the micro-kernels there is an error that lists the configurations that exist."""
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    if placement.startswith("onednn") and "onednn ok" not in torch.ops.fastpeft_cpu.gemm_libs()[0]:
        pytest.skip("oneDNN cannot run here: " + torch.ops.fastpeft_cpu.gemm_libs()[0])
    config = f"{placement}|{rank_impl}"
    monkeypatch.setenv("FASTPEFT_LORA_BR", "16")
    monkeypatch.setenv("FASTPEFT_LORA_GB", "48")
    monkeypatch.setenv("FASTPEFT_CPU_CONFIG", config)
    if r == 7 and rank_impl == "micro":
        with pytest.raises(RuntimeError, match="is not a configuration of lora_fwd"):
            check("cpu", 20, 129, 65, r, torch.float32)
        return
    check("cpu", 203, 129, 1100, r, torch.float32, p=0.2)
    check("cpu", 97, 129, 65, r, torch.float32, noncontig=True, train_weight=True)
    monkeypatch.setenv("FASTPEFT_CPU_CONFIG", config.replace("onednn", "aten"))  # fp64: ATen only
    check("cpu", 97, 129, 65, r, torch.float64, p=0.1)


def test_cpu_unknown_config_is_an_error(monkeypatch):
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    monkeypatch.setenv("FASTPEFT_CPU_CONFIG", "mkl+magic")
    with pytest.raises(RuntimeError, match="FASTPEFT_CPU_CONFIG='mkl\\+magic' is not a configuration"):
        check("cpu", 7, 9, 5, 2, torch.float32)
    monkeypatch.delenv("FASTPEFT_CPU_CONFIG")
    monkeypatch.setenv("FASTPEFT_CPU_GEMM", "blas")
    with pytest.raises(RuntimeError, match="FASTPEFT_CPU_GEMM: expected 'aten', 'onednn' or 'auto'"):
        check("cpu", 7, 9, 5, 2, torch.float32)


@pytest.mark.parametrize("r", [16, 7], ids=["r16", "r7"])
def test_cpu_tuned_choice_is_used_and_deterministic(monkeypatch, r):
    """A call big enough to be tuned: the shape class is timed once, listed in tune_table, and
    every later call gives bit-identical results (same configuration, fixed chunking)."""
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    import fastpeft

    torch.ops.fastpeft_cpu.tune_reset()
    g = torch.Generator().manual_seed(0)
    M, K, N = 512, 256, 320  # 42M multiply-adds: above the tuning threshold
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g) * K ** -0.5, torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, generator=g) * 0.1).requires_grad_()
    outs = []
    for _ in range(4):
        torch.manual_seed(3)  # same dropout seed every call
        y = fastpeft.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, training=True, backend="cpu")
        gx, gA, gB = torch.autograd.grad(y, (x, A, B), torch.ones_like(y))
        outs.append([y.detach(), gx, gA, gB])
    for o in outs[1:]:
        for a, c in zip(outs[0], o):
            assert torch.equal(a, c)
    table = torch.ops.fastpeft_cpu.tune_table()
    assert any(e.startswith("lora_fwd Float M~512 K=256 N=320") for e in table), table
    assert any(e.startswith("lora_bwd Float M~512 K=256 N=320") for e in table), table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dropout_and_bias(backend, p, bias):
    check(backend, 33, 129, 65, 7, torch.float32, bias=bias, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous(backend):
    check(backend, 7, 129, 65, 16, torch.float32, lead=(2, 3))
    check(backend, 7, 129, 65, 16, torch.float32, lead=(3,), noncontig=True, p=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_full_finetune_weight_grads(backend, bias):
    """Weight and bias trainable too (full fine-tuning + LoRA)."""
    check(backend, 33, 129, 65, 7, torch.float32, bias=bias, train_weight=True, p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_256(backend):
    if backend == "triton" and not torch.cuda.is_available():
        check(backend, 17, 64, 32, 256, torch.float32)
    else:
        check(backend, 65, 300, 129, 256, torch.float32)


# --- dropout semantics -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_and_determinism(backend):
    device = device_for(backend)
    M, K = (64, 64) if backend == "triton" else (512, 256)
    p = 0.3
    x = torch.ones(M, K, device=device)
    # identity weights isolate the LoRA branch: A = I (r = K), B = I, W = 0
    W = torch.zeros(K, K, device=device)
    eye = torch.eye(K, device=device)
    torch.manual_seed(7)
    y1 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend=backend)
    torch.manual_seed(7)
    y2 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend=backend)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    kept = (y1 != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02, kept
    torch.testing.assert_close(y1[y1 != 0], torch.full_like(y1[y1 != 0], 1 / (1 - p)))
    y3 = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=True, backend=backend)
    assert not torch.equal(y1, y3), "a fresh draw must give a fresh mask"
    y_eval = fastpeft.lora_linear(x, W, None, eye, eye, 1.0, dropout_p=p, training=False, backend=backend)
    torch.testing.assert_close(y_eval, torch.ones_like(y_eval))


def test_dropout_mask_is_never_stored():
    """Saved tensors are x (by reference), the weights and t (M, r): no M×K float mask or copy of x."""
    x = torch.randn(64, 96, requires_grad=True)
    W, A, B = torch.randn(80, 96), torch.randn(4, 96, requires_grad=True), torch.randn(80, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastpeft.lora_linear(x, W, None, A, B, 2.0, dropout_p=0.5, training=True)
    big = [tuple(t.shape) for t in saved if t.numel() >= x.numel() and t.shape != W.shape]
    assert all(t.data_ptr() == x.data_ptr() for t in saved if tuple(t.shape) == tuple(x.shape))
    assert big == [tuple(x.shape)], big


# --- gradcheck and opcheck ----------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
def test_gradcheck(backend, p):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, W, b, A, B = mk(2, 5, 11), mk(9, 11), mk(9), mk(3, 11), mk(9, 3)
    seed = 1234

    def f(x, W, b, A, B):
        torch.manual_seed(seed)  # same mask on every evaluation
        return fastpeft.lora_linear(x, W, b, A, B, 0.7, dropout_p=p, training=p > 0, backend=backend)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_opcheck(backend):
    x, W, b = torch.randn(7, 12), torch.randn(10, 12), torch.randn(10)
    A, B = torch.randn(3, 12), torch.randn(10, 3)
    seed = _dropout.new_seed(True)
    torch.library.opcheck(torch.ops.fastpeft.lora_fwd.default, (x, W, b, A, B, 0.5, 0.2, seed, backend))
    torch.library.opcheck(torch.ops.fastpeft.lora_fwd.default, (x, W, None, A, B, 0.5, 0.0, None, backend))
    dy, t = torch.randn(7, 10), torch.randn(7, 3)
    for need in [(True, True, True), (True, False, False), (False, False, False)]:
        torch.library.opcheck(torch.ops.fastpeft.lora_bwd.default,
                              (dy, x, W, A, B, t, 0.5, 0.2, seed, *need, backend))


def test_torch_compile_fullgraph():
    layer = fastpeft.LoRALinear(torch.nn.Linear(32, 24), r=4, lora_alpha=8, lora_dropout=0.0,
                                init_lora_weights=False)
    model = torch.nn.Sequential(layer, torch.nn.GELU(), torch.nn.Linear(24, 5))
    x = torch.randn(3, 6, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_autocast_cpu_bf16():
    x, W, b = torch.randn(9, 32), torch.randn(16, 32), torch.randn(16)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_linear(x, W, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    ref = lora_linear_reference(*upcast([x, W, b, A, B]), 0.5)
    assert_close(y, ref, torch.bfloat16, "y")
    y.float().sum().backward()
    assert A.grad is not None and A.grad.dtype == torch.float32


# --- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(6, 9)), r"weight: expected shape \(N, 8\)"),
    (dict(bias=torch.randn(5)), r"bias: expected shape \(6,\), got \(5,\)"),
    (dict(lora_A=torch.randn(2, 7)), r"lora_A: expected shape \(r, 8\)"),
    (dict(lora_B=torch.randn(6, 3)), r"lora_B: expected shape \(6, 2\), got \(6, 3\)"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), r"lora_B: expected dtype torch.float32"),
    (dict(x=torch.randint(0, 3, (4, 8))), r"x: expected a floating dtype"),
    (dict(dropout_p=1.0), r"dropout_p"),
    (dict(scaling="big"), r"scaling"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(6, 2), scaling=1.0, dropout_p=0.1, training=True)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fastpeft.lora_linear(**args)


def test_backend_override_errors_say_why(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "nonsense")
    with pytest.raises(RuntimeError, match="unknown backend"):
        fastpeft.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    y = fastpeft.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)
    assert y.shape == (2, 3)
