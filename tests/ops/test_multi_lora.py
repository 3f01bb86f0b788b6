"""fastpeft.multi_lora_linear (many LoRA adapters in one batch) on every backend vs the float64
oracle (fastpeft.reference.multi_lora: a loop over adapters, each on its own rows): the output and
every gradient (x, every adapter's A and B, W and bias), per-token and per-sample ids, base rows
(-1), adapters without rows, unsorted ids, non-contiguous x, dropout."""
import math

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft.reference.multi_lora import multi_lora_linear_reference
from fastpeft.testing import DTYPE_IDS, assert_close, upcast
from tests.conftest import backend_params, device_for

BACKENDS = backend_params("multi_lora")
NO_TRITON = [b for b in BACKENDS if b.id != "triton"]
NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


def make(lead, K, N, r, n, dtype, device, *, bias=True, train_weight=False, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed + K * 31 + N * 7 + r * 3 + n)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, 2 * K).to(device=device, dtype=dtype)[..., ::2] if noncontig else \
        rnd(*lead, K).to(device=device, dtype=dtype)
    W = (rnd(N, K) / math.sqrt(K)).to(device=device, dtype=dtype)
    b = rnd(N).to(device=device, dtype=dtype) if bias else None
    A = (rnd(n, r, K) / math.sqrt(K)).to(device=device, dtype=dtype)
    B = (rnd(n, N, r) / math.sqrt(r)).to(device=device, dtype=dtype)
    return [None if t is None else t.requires_grad_(grad)
            for t, grad in ((x, True), (W, train_weight), (b, train_weight), (A, True), (B, True))]


def make_ids(shape, n, *, seed=0, base=True, skip=()):
    """Unsorted ids in [-1, n) (without -1 unless ``base``), never using the adapters in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([a for a in range(-1 if base else 0, n) if a not in skip])
    return allowed[torch.randint(0, len(allowed), shape, generator=g)]


def check(backend, lead, K, N, r, n, dtype, p=0.0, *, per_sample=False, ids=None, scaling=None, bias=True,
          train_weight=False, noncontig=False, scale_tol=1.0):
    device = device_for(backend)
    ts = make(lead, K, N, r, n, dtype, device, bias=bias, train_weight=train_weight, noncontig=noncontig)
    if noncontig:
        assert not ts[0].is_contiguous()
    if ids is None:
        ids = make_ids(lead[:1] if per_sample else lead, n, seed=len(lead) + K)
    ids = ids.to(device)
    scaling = [0.5 + 0.25 * a for a in range(n)] if scaling is None else scaling
    torch.manual_seed(123)
    y = fastpeft.multi_lora_linear(*ts, scaling, ids, dropout_p=p, training=p > 0, backend=backend)
    torch.manual_seed(123)  # the same seed the op drew
    seed = _dropout.new_seed(p > 0)
    ref_in = upcast(ts)
    full_ids = ids.view(ids.shape[0], *([1] * (len(lead) - 1))).expand(lead) if per_sample else ids
    sc = scaling.tolist() if isinstance(scaling, torch.Tensor) else \
        (list(scaling) if isinstance(scaling, (list, tuple)) else [scaling] * n)
    y_ref = multi_lora_linear_reference(*ref_in, sc, full_ids.cpu().to(ref_in[0].device), p, seed)
    assert y.dtype == dtype and y.shape == (*lead, N) and y.device == ts[0].device
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
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}", scale=scale_tol)
    return ts, ids


def _skip_triton_fp64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels are fp32/fp16/bf16")


# --- shapes, ids, dtypes --------------------------------------------------------------------
SHAPES = [pytest.param(M, K, N, r, n, id=f"M{M}-K{K}-N{N}-r{r}-n{n}")
          for (M, K, N, r, n) in [(1, 129, 65, 1, 1), (7, 129, 65, 7, 3), (97, 129, 65, 16, 5), (40, 64, 48, 16, 8)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
def test_per_token_ids(backend, M, K, N, r, n, dtype):
    _skip_triton_fp64(backend, dtype)
    check(backend, (M,), K, N, r, n, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: DTYPE_IDS[d])
def test_per_sample_ids_leading_dims(backend, dtype):
    _skip_triton_fp64(backend, dtype)
    check(backend, (6, 5), 33, 29, 7, 4, dtype, per_sample=True)                      # per sample
    check(backend, (3, 4, 5), 33, 29, 7, 4, dtype, per_sample=True, noncontig=True)   # 3 leading dims
    check(backend, (6, 5), 33, 29, 7, 4, dtype)                                        # per token, 2-D ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_rows_empty_adapters_unsorted(backend):
    n = 6
    ids = torch.tensor([5, -1, 0, 5, -1, 2, 0, 5, 2, -1, -1, 0, 5])  # adapters 1, 3, 4: no rows
    (x, W, b, A, B), _ = check(backend, (13,), 40, 24, 4, n, torch.float32, ids=ids)
    for a in (1, 3, 4):
        assert torch.count_nonzero(A.grad[a]) == 0 and torch.count_nonzero(B.grad[a]) == 0
    # every row through the base layer only: the frozen linear, and no adapter gradient
    (x, W, b, A, B), _ = check(backend, (9,), 40, 24, 4, 3, torch.float32, ids=torch.full((9,), -1))
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0
    # a single adapter for every row
    check(backend, (9,), 40, 24, 4, 3, torch.float32, ids=torch.full((9,), 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_x_train_weight_no_bias(backend):
    check(backend, (31,), 48, 36, 5, 4, torch.float32, noncontig=True, train_weight=True)
    check(backend, (31,), 48, 36, 5, 4, torch.float32, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout(backend, p):
    check(backend, (37,), 65, 33, 6, 4, torch.float32, p=p)
    check(backend, (4, 9), 65, 33, 6, 4, torch.float32, p=p, per_sample=True, noncontig=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_forms(backend):
    check(backend, (21,), 24, 20, 3, 3, torch.float32, scaling=0.7)
    check(backend, (21,), 24, 20, 3, 3, torch.float32, scaling=torch.tensor([0.1, -2.0, 3.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_half(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("triton's interpreter returns garbage for bf16 tl.dot; checked on GPU")
    check(backend, (97,), 129, 65, 16, 5, dtype)
    check(backend, (5, 7), 129, 65, 7, 3, dtype, p=0.25, per_sample=True)


@pytest.mark.parametrize("backend", NO_TRITON)
def test_large_rows_ragged_blocks(backend, monkeypatch):
    check(backend, (1025,), 129, 65, 16, 7, torch.float32, p=0.1)
    monkeypatch.setenv("FASTPEFT_MULTI_LORA_BR", "3")  # tiny C++ blocks: ragged tails in every segment
    check(backend, (50,), 33, 17, 5, 4, torch.float64, p=0.2)


@pytest.mark.parametrize("lib", ["aten", "onednn"])
def test_cpu_gemm_libraries(monkeypatch, lib):
    """The C++ op's frozen GEMMs (y += x·Wᵀ, dx += dy·W, dW = dyᵀ·x) on each library tune.h chooses
    between, forced by name; fp64 keeps ATen whatever is asked."""
    if "cpu" not in [b.id for b in BACKENDS]:
        pytest.skip("C++ backend not built")
    if lib == "onednn" and "onednn ok" not in torch.ops.fastpeft_cpu.gemm_libs()[0]:
        pytest.skip("oneDNN cannot run here")
    monkeypatch.setenv("FASTPEFT_CPU_CONFIG", lib)
    check("cpu", (600,), 129, 97, 16, 5, torch.float32, p=0.1, noncontig=True, train_weight=True)
    check("cpu", (4, 9), 65, 33, 6, 4, torch.float32, per_sample=True)
    with pytest.raises(RuntimeError, match="FASTPEFT_CPU_CONFIG"):
        monkeypatch.setenv("FASTPEFT_CPU_CONFIG", "nope")
        check("cpu", (9,), 65, 33, 6, 4, torch.float32)


# --- equal to the single-adapter op, row group by row group -----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_lora_linear_per_adapter(backend):
    """Each adapter's rows give what ``lora_linear`` gives them with that adapter, the dropout mask
    included (the same counter-based mask over x's logical (M, K) view)."""
    device = device_for(backend)
    x, W, b, A, B = [t.detach() for t in make((29,), 40, 24, 4, 3, torch.float32, device)]
    ids = make_ids((29,), 3, seed=3).to(device)
    for p in (0.0, 0.3):
        torch.manual_seed(9)
        y = fastpeft.multi_lora_linear(x, W, b, A, B, [0.5, 1.5, 2.0], ids, dropout_p=p, training=True,
                                       backend=backend)
        for a, s in enumerate([0.5, 1.5, 2.0]):
            torch.manual_seed(9)
            ya = fastpeft.lora_linear(x, W, b, A[a], B[a], s, dropout_p=p, training=True, backend=backend)
            rows = ids == a
            torch.testing.assert_close(y[rows], ya[rows], atol=2e-5, rtol=1e-4)
        base = ids == -1
        torch.testing.assert_close(y[base], torch.nn.functional.linear(x[base], W, b), atol=2e-5, rtol=1e-4)


def test_different_ranks_zero_padding():
    """Adapters of ranks 2, 5, 3 zero-padded to 5 by stack_lora_weights: the same output and
    gradients as each adapter alone."""
    g = torch.Generator().manual_seed(1)
    K, N = 20, 12
    ranks = [2, 5, 3]
    As = [torch.randn(r, K, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    Bs = [torch.randn(N, r, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    x = torch.randn(15, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    ids = make_ids((15,), 3, seed=2)
    A, B = fastpeft.stack_lora_weights(As, Bs)
    assert A.shape == (3, 5, K) and B.shape == (3, N, 5)
    y = fastpeft.multi_lora_linear(x, W, None, A, B, 1.0, ids)
    y.square().sum().backward()
    got = [t.grad.clone() for t in As + Bs]
    for t in As + Bs:
        t.grad = None
    ref = torch.nn.functional.linear(x, W)
    for a in range(3):
        rows = ids == a
        ref = ref.index_put((rows,), ref[rows] + x[rows] @ As[a].t() @ Bs[a].t())
    torch.testing.assert_close(y, ref)
    ref.square().sum().backward()
    for g_, t in zip(got, As + Bs):
        torch.testing.assert_close(g_, t.grad)


# --- determinism, gradcheck, opcheck ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    device = device_for(backend)
    ids = make_ids((300,), 5, seed=1).to(device)
    outs = []
    for _ in range(2):
        x, W, b, A, B = make((300,), 64, 48, 8, 5, torch.float32, device)
        torch.manual_seed(3)
        y = fastpeft.multi_lora_linear(x, W, b, A, B, 0.5, ids, dropout_p=0.2, training=True, backend=backend)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad, A.grad, B.grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", NO_TRITON)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
def test_gradcheck(backend, p):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, W, b, A, B = mk(3, 4, 11), mk(9, 11), mk(9), mk(3, 2, 11), mk(3, 9, 2)
    ids = torch.tensor([[0, 2, -1, 2], [1, 1, 0, -1], [2, 2, 2, 0]])

    def f(x, W, b, A, B):
        torch.manual_seed(1234)  # the same mask on every evaluation
        return fastpeft.multi_lora_linear(x, W, b, A, B, [0.7, -1.1, 0.4], ids, dropout_p=p, training=p > 0,
                                          backend=backend)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    mk = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    x, W, b, A, B = mk(9, 16), mk(10, 16), mk(10), mk(3, 4, 16), mk(3, 10, 4)
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0, 0, 2], device=device)
    seed = _dropout.new_seed(True)
    s = [0.5, 1.0, 2.0]
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_fwd.default, (x, W, b, A, B, s, ids, 0.2, seed, backend))
    torch.library.opcheck(torch.ops.fastpeft.multi_lora_fwd.default, (x, W, None, A, B, s, ids, 0.0, None, backend))
    dy, t = mk(9, 10), mk(9, 4)
    for need in [(True, True, True), (True, False, False), (False, False, False)]:
        torch.library.opcheck(torch.ops.fastpeft.multi_lora_bwd.default,
                              (dy, x, W, A, B, t, s, ids, 0.2, seed, *need, backend))


def test_torch_compile_fullgraph():
    layer = fastpeft.MultiLoRALinear(torch.nn.Linear(32, 24), num_adapters=3, r=4)
    torch.nn.init.normal_(layer.lora_B)
    x, ids = torch.randn(4, 6, 32), torch.tensor([2, -1, 0, 2])
    eager = layer(x, ids)
    compiled = torch.compile(lambda x: layer(x, ids), fullgraph=False, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


# --- module and errors --------------------------------------------------------------------------
def test_module_trains_only_the_rows_adapters():
    torch.manual_seed(0)
    layer = fastpeft.MultiLoRALinear(torch.nn.Linear(16, 8), num_adapters=4, r=2, lora_alpha=4)
    assert not layer.base_layer.weight.requires_grad
    x, ids = torch.randn(5, 3, 16), torch.tensor([1, 3, -1, 1, 3])
    assert torch.equal(layer(x, ids), layer.base_layer(x))  # B starts at zero: the base layer
    layer(x, ids).square().sum().backward()
    used = layer.lora_B.grad.flatten(1).abs().sum(1) > 0  # (dA is 0 while B is 0)
    assert used.tolist() == [False, True, False, True]


def test_errors():
    x, W, A, B = torch.randn(4, 5, 8), torch.randn(6, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    ok = torch.tensor([0, 1, 2, -1])
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape \(4, 5\).*or \(4,\)"):
        fastpeft.multi_lora_linear(x, W, None, A, B, 1.0, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"adapter_ids: expected ids in \[-1, 3\)"):
        fastpeft.multi_lora_linear(x, W, None, A, B, 1.0, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(ValueError, match="adapter_ids: expected dtype torch.int64"):
        fastpeft.multi_lora_linear(x, W, None, A, B, 1.0, ok.int())
    with pytest.raises(ValueError, match=r"lora_B: expected shape \(3, 6, 2\)"):
        fastpeft.multi_lora_linear(x, W, None, A, B[:2], 1.0, ok)
    with pytest.raises(ValueError, match=r"lora_A: expected shape \(n, r, 8\)"):
        fastpeft.multi_lora_linear(x, W, None, A[..., :4], B, 1.0, ok)
    with pytest.raises(ValueError, match=r"scaling: expected a float or a tensor of shape \(3,\)"):
        fastpeft.multi_lora_linear(x, W, None, A, B, torch.ones(2), ok)
    with pytest.raises(ValueError, match="dropout_p"):
        fastpeft.multi_lora_linear(x, W, None, A, B, 1.0, ok, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"lora_Bs\[1\]: expected shape"):
        fastpeft.stack_lora_weights([torch.randn(2, 8), torch.randn(3, 8)], [torch.randn(6, 2), torch.randn(6, 2)])
