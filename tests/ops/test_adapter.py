"""fastpeft.adapter on every backend vs the autograd oracle (fastpeft.reference.adapter)."""
import math

import pytest
import torch

import fastpeft
from fastpeft import _dropout
from fastpeft.ops.adapter import AdapterFunction
from fastpeft.reference.adapter import ACTIVATIONS, adapter_reference
from fastpeft.testing import DTYPE_IDS, assert_close, upcast
from tests.conftest import _cpp_ok, backend_params, device_for

BACKENDS = backend_params()
CPU_LIKE = [p for p in BACKENDS if p.id in ("reference", "cpu")]


def make(M, d, m, dtype, device, lead=(), bias=True, scale="float", residual=False, noncontig=False,
         x_grad=True):
    """Inputs (x, Wd, bd, Wu, bu, scaling, residual) with weights of unit-ish output scale."""
    g = torch.Generator().manual_seed(M * 7919 + d * 31 + m)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # non-contiguous: a transposed buffer (a leaf whose rows are strided)
    x = rnd(*lead, d, M).transpose(-1, -2) if noncontig else rnd(*lead, M, d)
    Wd, Wu = rnd(m, d) / math.sqrt(d), rnd(d, m) / math.sqrt(m)
    bd, bu = (rnd(m), rnd(d)) if bias else (None, None)
    s = {"float": 0.7, "scalar": rnd(()), "vector": rnd(d)}[scale]
    R = rnd(*lead, M, d) if residual else None

    def dev(t, grad=True):
        if t is None or not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    x = dev(x, x_grad)  # .to() keeps the transposed strides
    return [x, dev(Wd), dev(bd), dev(Wu), dev(bu), dev(s), dev(R)]


def check(backend, M, d, m, dtype, activation="gelu", lead=(), bias=True, scale="float", residual=False,
          noncontig=False, p=0.0, x_grad=True, tol_scale=1.0):
    device = device_for(backend)
    ts = make(M, d, m, dtype, device, lead, bias, scale, residual, noncontig, x_grad)
    if noncontig:
        assert not ts[0].is_contiguous()
    x, Wd, bd, Wu, bu, s, R = ts
    torch.manual_seed(123)
    y = fastpeft.adapter(x, Wd, bd, Wu, bu, activation, s, R, dropout_p=p, training=p > 0, backend=backend)
    torch.manual_seed(123)
    seed = _dropout.new_seed(p > 0)
    ref = upcast(ts)
    y_ref = adapter_reference(*ref[:5], activation, ref[5], ref[6], p, seed)
    assert y.dtype == dtype and y.shape == (*lead, M, d)
    assert_close(y, y_ref, dtype, "y", scale=tol_scale)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.backward(dy.to(device=device, dtype=dtype))
    y_ref.backward(dy.to(device))
    names = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual"]
    for name, t, t_ref in zip(names, ts, ref):
        if not isinstance(t, torch.Tensor):
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name} should get no gradient"
            continue
        assert t.grad is not None, f"{name} got no gradient"
        assert t.grad.shape == t.shape, f"d{name}: shape {tuple(t.grad.shape)} != {tuple(t.shape)}"
        assert_close(t.grad, t_ref.grad, dtype, f"d{name}", scale=tol_scale)
    return y


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton kernels are fp32/fp16/bf16")
    if backend == "triton" and dtype == torch.bfloat16 and device_for(backend) == "cpu":
        pytest.skip("tl.dot on bf16 is wrong in the triton interpreter")


# --- shapes and dtypes -------------------------------------------------------------------
SHAPES = [pytest.param(M, d, m, id=f"M{M}-d{d}-m{m}")
          for (M, d, m) in [(1, 129, 1), (7, 129, 8), (97, 129, 64), (33, 64, 16)]]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,d,m", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: DTYPE_IDS[t])
def test_shapes_dtypes(backend, M, d, m, dtype):
    skip_unsupported(backend, dtype)
    check(backend, M, d, m, dtype, scale="vector", residual=dtype in (torch.float16, torch.float64))


@pytest.mark.parametrize("backend", CPU_LIKE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda t: DTYPE_IDS[t])
def test_many_rows(backend, dtype):
    check(backend, 1025, 129, 64, dtype, scale="vector")


@pytest.mark.parametrize("backend", CPU_LIKE)
def test_many_rows_dropout_residual(backend):
    check(backend, 1025, 64, 8, torch.float32, activation="silu", scale="scalar", residual=True, p=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
def test_activations(backend, activation, residual):
    check(backend, 33, 64, 16, torch.float32, activation=activation, residual=residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["float", "scalar", "vector"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_scaling_and_bias(backend, scale, bias):
    check(backend, 7, 129, 8, torch.float32, activation="relu", scale=scale, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_noncontiguous(backend):
    check(backend, 5, 48, 16, torch.float32, lead=(2, 3), noncontig=True, scale="vector", residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input(backend):
    """x without grad (first layer): only the adapter's own parameters get gradients."""
    check(backend, 9, 32, 16, torch.float32, x_grad=False, scale="scalar")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_dropout_matches_reference(backend, activation):
    check(backend, 37, 64, 16, torch.float32, activation=activation, p=0.25, residual=activation == "relu")


# --- C++ blocking and per-block paths ----------------------------------------------------
CPU_PATHS = ["aten", "onednn", "micro"]


def _path_available(path, dtype):
    if path == "onednn":
        libs = torch.ops.fastpeft_cpu.gemm_libs()[0]
        if dtype != torch.float32:
            return "oneDNN is used for float32 only"
        if "onednn ok" not in libs:
            return "oneDNN cannot run here: " + libs
    return None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda t: DTYPE_IDS[t])
@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_paths_small_blocks(monkeypatch, dtype, path):
    """Every per-block path the C++ op can choose at run time (csrc/tune.h), forced by name, with
    many row blocks per thread plus a ragged tail. m = 16/32/64 fill whole vectors (the
    micro-kernels take them); m = 8 or 12 runs on a GEMM library whatever is asked, and forcing
    "micro" there is an error that names the paths that exist."""
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    why = _path_available(path, dtype)
    if why:
        pytest.skip(why)
    monkeypatch.setenv("FASTPEFT_ADAPTER_BR", "16")
    monkeypatch.setenv("FASTPEFT_CPU_CONFIG", path)
    check("cpu", 97, 129, 16, dtype, activation="gelu_tanh", scale="vector", p=0.2)
    check("cpu", 97, 64, 32, dtype, activation="silu", scale="scalar", residual=True)
    check("cpu", 61, 40, 64, dtype, activation="relu", scale="vector", x_grad=False)
    if path == "micro":
        with pytest.raises(RuntimeError, match="FASTPEFT_CPU_CONFIG='micro' is not a configuration"):
            check("cpu", 9, 32, 12, dtype)
    else:
        check("cpu", 97, 129, 12, dtype, activation="gelu", scale="scalar", p=0.1)


def test_cpu_tuned_path_deterministic():
    """A call big enough to be tuned: timed once per shape class, listed in tune_table, and
    later calls give bit-identical outputs and gradients."""
    if not _cpp_ok():
        pytest.skip("C++ backend not built")
    torch.ops.fastpeft_cpu.tune_reset()
    g = torch.Generator().manual_seed(0)
    M, d, m = 2048, 256, 64
    x = torch.randn(M, d, generator=g, requires_grad=True)
    Wd = (torch.randn(m, d, generator=g) * d ** -0.5).requires_grad_()
    Wu = (torch.randn(d, m, generator=g) * m ** -0.5).requires_grad_()
    bd, bu = torch.zeros(m, requires_grad=True), torch.zeros(d, requires_grad=True)
    outs = []
    for _ in range(3):
        torch.manual_seed(5)
        y = fastpeft.adapter(x, Wd, bd, Wu, bu, "gelu", 0.5, dropout_p=0.1, training=True, backend="cpu")
        grads = torch.autograd.grad(y, (x, Wd, bd, Wu, bu), torch.ones_like(y))
        outs.append((y.detach(),) + grads)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)
    table = torch.ops.fastpeft_cpu.tune_table()
    assert any(e.startswith("adapter_fwd Float M~2048 d=256 m=64 gelu drop") for e in table), table
    assert any(e.startswith("adapter_bwd Float M~2048 d=256 m=64 gelu drop") for e in table), table


# --- dropout statistics and determinism --------------------------------------------------
def _identity_adapter(backend, M, d, p, seed_value):
    """Adapter that computes drop(x) exactly: Wd = Wu = I, no biases, identity act, R = 0."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(M, d, generator=g) + 0.5).to(device)  # nonzero everywhere
    eye = torch.eye(d, device=device)
    torch.manual_seed(seed_value)
    return x, fastpeft.adapter(x, eye, None, eye, None, "identity", 1.0, torch.zeros_like(x), dropout_p=p,
                               training=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_rate_and_determinism(backend):
    M, d, p = (64, 32, 0.3) if backend == "triton" else (256, 64, 0.3)
    x, y = _identity_adapter(backend, M, d, p, 7)
    kept = y != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / (M * d)) + 1e-3, rate
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    _, y2 = _identity_adapter(backend, M, d, p, 7)
    assert torch.equal(y, y2), "same torch.manual_seed must give the same mask"
    _, y3 = _identity_adapter(backend, M, d, p, 8)
    assert not torch.equal(y, y3), "a different seed must give a different mask"
    # no dropout at eval time
    eye = torch.eye(d, device=x.device)
    y_eval = fastpeft.adapter(x, eye, None, eye, None, "identity", 1.0, torch.zeros_like(x), dropout_p=p,
                              training=False, backend=backend)
    torch.testing.assert_close(y_eval, x)


# --- gradcheck and opcheck -----------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_LIKE)
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("scale", ["scalar", "vector"])
def test_gradcheck(backend, residual, scale):
    x, Wd, bd, Wu, bu, s, R = make(6, 7, 3, torch.float64, "cpu", lead=(2,), scale=scale, residual=residual)
    seed = torch.tensor(12345, dtype=torch.int64)

    def f(x, Wd, bd, Wu, bu, s, *rest):
        r = rest[0] if rest else None
        return AdapterFunction.apply(x, Wd, bd, Wu, bu, s, 1.0, r, "gelu", 0.2, seed, backend)

    inputs = (x, Wd, bd, Wu, bu, s) + ((R,) if residual else ())
    assert torch.autograd.gradcheck(f, inputs)


def _op_args(backend, M=9, d=32, m=16, dtype=torch.float32, residual=False, p=0.0):
    device = device_for(backend)
    x, Wd, bd, Wu, bu, s, R = make(M, d, m, dtype, device, residual=residual)
    scale = torch.full((), 0.5, dtype=dtype, device=device).expand(d)  # stride 0, as the Function sends
    seed = torch.tensor(99, dtype=torch.int64) if p > 0 else None
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in (x, Wd, bd, Wu, bu)], scale, R, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
def test_opcheck(backend, residual):
    (x, Wd, bd, Wu, bu), scale, R, seed = _op_args(backend, residual=residual, p=0.1)
    R = None if R is None else R.detach()
    torch.library.opcheck(torch.ops.fastpeft.adapter_fwd.default,
                          (x, Wd, bd, Wu, bu, scale, R, "gelu", 0.1, seed, backend))
    y, z = torch.ops.fastpeft.adapter_fwd(x, Wd, bd, Wu, bu, scale, R, "gelu", 0.1, seed, backend)
    dy = torch.randn_like(y)
    for need_x, need_scale in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.fastpeft.adapter_bwd.default,
                              (dy, x, Wd, Wu, bu, z, scale, "gelu", 0.1, seed, R is None, need_x, need_scale,
                               backend))


# --- autocast --------------------------------------------------------------------------------
def test_autocast_cpu():
    x, Wd, bd, Wu, bu, s, _ = make(8, 32, 8, torch.float32, "cpu", scale="vector")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.adapter(x, Wd, bd, Wu, bu, "relu", s)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert Wd.grad.dtype == torch.float32 and s.grad.shape == s.shape


# --- bad inputs ------------------------------------------------------------------------------
def _good():
    d, m = 16, 4
    return dict(x=torch.randn(3, d), down_weight=torch.randn(m, d), down_bias=torch.randn(m),
                up_weight=torch.randn(d, m), up_bias=torch.randn(d))


BAD = [
    ("x", lambda a: a.update(x=torch.randint(0, 3, (3, 16)))),
    ("down_weight", lambda a: a.update(down_weight=torch.randn(4, 15))),
    ("down_weight", lambda a: a.update(down_weight=torch.randn(4, 16, 1))),
    ("down_weight", lambda a: a.update(down_weight=torch.randn(4, 16, dtype=torch.float64))),
    ("down_bias", lambda a: a.update(down_bias=torch.randn(5))),
    ("up_weight", lambda a: a.update(up_weight=torch.randn(16, 5))),
    ("up_weight", lambda a: a.update(up_weight=torch.randn(4, 16))),
    ("up_bias", lambda a: a.update(up_bias=torch.randn(15))),
    ("up_bias", lambda a: a.update(up_bias=torch.randn(16, dtype=torch.float16))),
    ("activation", lambda a: a.update(activation="tanh")),
    ("activation", lambda a: a.update(activation=None)),
    ("scaling", lambda a: a.update(scaling=torch.randn(15))),
    ("scaling", lambda a: a.update(scaling=torch.randn(1, 16))),
    ("scaling", lambda a: a.update(scaling="0.5")),
    ("scaling", lambda a: a.update(scaling=torch.randn((), dtype=torch.float64))),
    ("residual", lambda a: a.update(residual=torch.randn(3, 15))),
    ("residual", lambda a: a.update(residual=torch.randn(16))),
    ("residual", lambda a: a.update(residual=torch.randn(3, 16, dtype=torch.float64))),
    ("dropout_p", lambda a: a.update(dropout_p=1.0, training=True)),
    ("dropout_p", lambda a: a.update(dropout_p=-0.1, training=True)),
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs(name, mutate):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        fastpeft.adapter(**args, backend="reference")


@pytest.mark.parametrize("name", ["down_weight", "up_bias", "residual"])
def test_device_mismatch(name):
    args = _good()
    args[name] = (args[name] if name != "residual" else args["x"]).to("meta")
    with pytest.raises(ValueError, match=f"{name}.*device"):
        fastpeft.adapter(**args)
