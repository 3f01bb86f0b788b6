"""Edge cases on every backend: empty dims give the reference's (empty / zero) results, dims that
cannot make sense and bad hyper-parameters give a ValueError naming the argument, and
non-finite or negative scalings behave as the reference defines."""
import math

import pytest
import torch

import fastpeft
from fastpeft.reference.adapter import adapter_reference
from fastpeft.testing import assert_close
from tests.conftest import backend_params, device_for
from tests.ops import test_adapter, test_lora, test_prefix_attention

LORA_BACKENDS = backend_params("lora")
ADAPTER_BACKENDS = backend_params("adapter")
PREFIX_BACKENDS = backend_params("prefix_attention")
INF = math.inf


# --- empty dims: outputs and every gradient against the oracle ----------------------------------
#: (M, K, N, lead): K = 0 is y = b with dx, dA empty and dB = 0; N = 0 gives an empty y with
#: dx = dA = 0; M = 0 rows give zero weight gradients.
LORA_EMPTY = [
    pytest.param(3, 0, 5, (), id="K0"),
    pytest.param(3, 4, 0, (), id="N0"),
    pytest.param(0, 4, 5, (), id="M0"),
    pytest.param(0, 0, 0, (), id="M0-K0-N0"),
    pytest.param(4, 6, 5, (2, 0), id="lead-2x0"),
    pytest.param(2, 0, 3, (0,), id="lead-0-K0"),
]


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("M,K,N,lead", LORA_EMPTY)
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout"])
def test_lora_empty_dims(backend, M, K, N, lead, dropout):
    for bias in (True, False):
        test_lora.check(backend, M, K, N, 3, torch.float32, p=0.3 if dropout else 0.0, lead=lead, bias=bias,
                        train_weight=True)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_empty_dims_fp64_fp16(backend):
    for dtype in (torch.float64, torch.float16):
        if backend == "triton" and dtype == torch.float64:
            continue
        test_lora.check(backend, 3, 0, 5, 2, dtype, train_weight=True)
        test_lora.check(backend, 3, 4, 0, 2, dtype, train_weight=True)


#: (M, d, lead): d = 0 leaves z = bd (dbd = 0 since dy is empty); M = 0 rows.
ADAPTER_EMPTY = [
    pytest.param(3, 0, (), id="d0"),
    pytest.param(0, 6, (), id="M0"),
    pytest.param(0, 0, (), id="M0-d0"),
    pytest.param(4, 6, (2, 0), id="lead-2x0"),
    pytest.param(2, 0, (3,), id="lead-3-d0"),
]


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
@pytest.mark.parametrize("M,d,lead", ADAPTER_EMPTY)
@pytest.mark.parametrize("scale", ["float", "scalar", "vector"])
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "parallel"])
def test_adapter_empty_dims(backend, M, d, lead, scale, residual):
    test_adapter.check(backend, M, d, 4, torch.float32, activation="gelu", lead=lead, scale=scale,
                       residual=residual)


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_adapter_empty_dims_dropout(backend):
    test_adapter.check(backend, 3, 0, 4, torch.float32, activation="silu", scale="vector", p=0.3)
    test_adapter.check(backend, 0, 8, 4, torch.float32, activation="relu", scale="scalar", p=0.3)


# --- dims that cannot make sense: a ValueError naming the argument --------------------------------
@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_lora_rank_zero_raises(backend):
    dev = device_for(backend)
    x, W, A, B = (torch.randn(*s, device=dev) for s in ((3, 4), (5, 4), (0, 4), (5, 0)))
    with pytest.raises(ValueError, match=r"lora_A: expected shape \(r, 4\) with r >= 1, got \(0, 4\)"):
        fastpeft.lora_linear(x, W, None, A, B, 1.0, backend=backend)


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_adapter_bottleneck_zero_raises(backend):
    dev = device_for(backend)
    x, Wd, Wu = (torch.randn(*s, device=dev) for s in ((3, 4), (0, 4), (4, 0)))
    with pytest.raises(ValueError, match=r"down_weight: expected shape \(m, 4\) with m >= 1.*got \(0, 4\)"):
        fastpeft.adapter(x, Wd, None, Wu, None, backend=backend)


# --- dropout_p is checked whether or not dropout is active --------------------------------------
BAD_DROPOUT = [pytest.param(v, id=i) for v, i in
               ((5, "5"), (1.0, "1.0"), (-0.1, "negative"), (math.nan, "nan"), (math.inf, "inf"),
                (True, "bool"), ("0.1", "str"), (None, "None"))]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("p", BAD_DROPOUT)
def test_bad_dropout_raises_in_eval_too(p, training):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
        fastpeft.lora_linear(x, torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), 1.0,
                             dropout_p=p, training=training)
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
        fastpeft.adapter(x, torch.randn(2, 4), None, torch.randn(4, 2), None, dropout_p=p, training=training)


# --- scaling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [pytest.param(v, id=i) for v, i in
                               ((math.nan, "nan"), (INF, "inf"), (-INF, "-inf"), (True, "bool"),
                                (torch.tensor(math.nan), "nan-tensor"))])
def test_lora_nonfinite_scaling_raises(s):
    """LoRA's scaling is a float hyper-parameter (alpha/r): NaN or ±inf can only be a mistake."""
    with pytest.raises(ValueError, match="scaling: expected a"):
        fastpeft.lora_linear(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), s)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("scaling", [-0.75, 0.0, -3.0], ids=["negative", "zero", "negative-big"])
def test_lora_negative_and_zero_scaling(backend, scaling):
    test_lora.check(backend, 33, 40, 24, 4, torch.float32, scaling=scaling, p=0.2, train_weight=True)
    test_lora.check(backend, 33, 40, 24, 16, torch.float32, scaling=scaling)


def test_adapter_nan_float_scaling_raises():
    with pytest.raises(ValueError, match="scaling: expected a float that is not NaN, got nan"):
        fastpeft.adapter(torch.randn(3, 4), torch.randn(2, 4), None, torch.randn(4, 2), None, scaling=math.nan)


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
@pytest.mark.parametrize("scale", ["float", "scalar", "vector"])
def test_adapter_negative_and_zero_scaling(backend, scale):
    for value in (-0.6, 0.0):
        _check_adapter_scaling(backend, scale, value)


def _check_adapter_scaling(backend, kind, value):
    """test_adapter.check with the scaling replaced by ``value`` (float, 0-dim or a (d,) tensor)."""
    M, d, m = 21, 40, 8
    dev = device_for(backend)
    x, Wd, bd, Wu, bu, _, _ = test_adapter.make(M, d, m, torch.float32, dev, scale="float")
    if kind == "float":
        s = value
    else:
        s = torch.full(() if kind == "scalar" else (d,), value, dtype=torch.float64)
        if kind == "vector":
            s[::3] = 0.5
        s = s.to(device=dev, dtype=torch.float32).requires_grad_()
    ts = [x, Wd, bd, Wu, bu, s]
    y = fastpeft.adapter(x, Wd, bd, Wu, bu, "gelu", s, backend=backend)
    ref = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in ts]
    y_ref = adapter_reference(*ref[:5], "gelu", ref[5])
    assert_close(y, y_ref, torch.float32, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(dy.to(dev, torch.float32))
    y_ref.backward(dy.to(dev))
    for name, t, r in zip(["x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling"], ts, ref):
        if isinstance(t, torch.Tensor):
            assert_close(t.grad, r.grad, torch.float32, f"d{name}")


def _same_nonfinite(a, b, name):
    """Same NaN / +inf / -inf positions, and the finite entries close."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, name
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(f(a), f(b)), f"{name}: {f.__name__} positions differ"
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


ADAPTER_INF = [pytest.param("float", INF, id="float-inf"), pytest.param("float", -INF, id="float-neg-inf"),
               pytest.param("scalar", INF, id="scalar-inf"), pytest.param("vector", INF, id="vector-with-inf"),
               pytest.param("vector", math.nan, id="vector-with-nan")]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
@pytest.mark.parametrize("kind,value", ADAPTER_INF)
def test_adapter_nonfinite_scaling_follows_reference(backend, kind, value):
    """scaling = ±inf: y = R + scale ⊙ u is ±inf where u != 0, as in the reference (the fused CPU
    forward folds the scale into Wu only while every scale entry is finite). Gradients: the same
    non-finite pattern and finite values as the reference backend's kernels, on every backend.

    (dWu = scale ⊙ Σ dyᵀh and dbu = scale ⊙ Σ dy there, while autograd through the oracle sums
    scale·dy terms: where those mix +inf and -inf the oracle has NaN and the kernels ±inf.)
    """
    M, d, m = 19, 24, 5
    dev = device_for(backend)
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(*s, generator=g) for s in ((M, d), (m, d), (m,), (d, m), (d,))]
    dy = torch.randn(M, d, generator=g)
    if kind == "float":
        s0 = value
    else:
        s0 = torch.full((), value) if kind == "scalar" else torch.randn(d, generator=g)
        if kind == "vector":
            s0[2], s0[5] = value, -value
    results = {}
    for be in ("reference", backend):
        ts = [t.to(dev).requires_grad_() for t in base]
        s = s0.to(dev).requires_grad_() if isinstance(s0, torch.Tensor) else s0
        y = fastpeft.adapter(*ts, "gelu", s, backend=be)
        y.backward(dy.to(dev))
        results[be] = [y] + [t.grad for t in ts] + ([s.grad] if isinstance(s, torch.Tensor) else [])
        if be == "reference":  # the forward as the oracle defines it
            ref_s = s0.double() if isinstance(s0, torch.Tensor) else s0
            y_ref = adapter_reference(*(t.double() for t in base), "gelu", ref_s)
            _same_nonfinite(y, y_ref, "y (reference backend vs oracle)")
            assert not torch.isfinite(y_ref).all()
    names = ["y", "dx", "ddown_weight", "ddown_bias", "dup_weight", "dup_bias", "dscaling"]
    for name, a, b in zip(names, results[backend], results["reference"]):
        _same_nonfinite(a, b, f"{name} ({backend} vs reference)")


# --- prefix attention: no queries (B = 0 or L = 0) or no main keys (S = 0) --------------------------
#: (B, H, Hkv, L, S, P, D, Bp)
PREFIX_EMPTY = [
    pytest.param((0, 4, 2, 5, 6, 3, 16, 1), id="B0-shared"),
    pytest.param((0, 4, 2, 5, 6, 3, 16, 0), id="B0-perSample"),
    pytest.param((2, 4, 2, 0, 6, 3, 16, 1), id="L0-shared"),
    pytest.param((2, 4, 1, 0, 6, 3, 16, 2), id="L0-perSample"),
    pytest.param((2, 4, 2, 5, 0, 3, 16, 1), id="S0-shared"),
    pytest.param((2, 2, 2, 5, 0, 3, 16, 2), id="S0-perSample"),
]


@pytest.mark.parametrize("backend", PREFIX_BACKENDS)
@pytest.mark.parametrize("shape", PREFIX_EMPTY)
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bool_LS"), (True, "add_BHLS")],
                         ids=["full", "causal", "boolmask", "causal-addmask"])
def test_prefix_attention_empty_dims(backend, shape, causal, mask):
    B, H, Hkv, L, S, P, D, Bp = shape
    test_prefix_attention.check(backend, B, H, Hkv, L, S, P, D, Bp, torch.float32, causal=causal, mask=mask)


@pytest.mark.parametrize("shapes,msg", [
    pytest.param(dict(q=(2, 0, 5, 8)), "q: expected shape (B, H, L, D) with H >= 1 and D >= 1", id="H0"),
    pytest.param(dict(q=(2, 4, 5, 0), k=(2, 2, 6, 0), v=(2, 2, 6, 0), prefix_k=(1, 2, 3, 0), prefix_v=(1, 2, 3, 0)),
                 "q: expected shape (B, H, L, D) with H >= 1 and D >= 1", id="D0"),
    pytest.param(dict(k=(2, 0, 6, 8), v=(2, 0, 6, 8), prefix_k=(1, 0, 3, 8), prefix_v=(1, 0, 3, 8)),
                 "k: expected shape (2, Hkv, S, 8) with Hkv >= 1", id="Hkv0"),
    pytest.param(dict(prefix_k=(1, 2, 0, 8), prefix_v=(1, 2, 0, 8)), "with P >= 1", id="P0"),
])
def test_prefix_attention_senseless_dims_raise(shapes, msg):
    """No heads or an empty head dim has no meaning; P = 0 would leave fully masked rows empty."""
    dims = dict(q=(2, 4, 5, 8), k=(2, 2, 6, 8), v=(2, 2, 6, 8), prefix_k=(1, 2, 3, 8), prefix_v=(1, 2, 3, 8))
    dims.update(shapes)
    with pytest.raises(ValueError) as e:
        fastpeft.prefix_attention(**{n: torch.randn(*s) for n, s in dims.items()})
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("scale", [math.nan, INF, -INF, "0.1"], ids=["nan", "inf", "-inf", "str"])
def test_prefix_attention_nonfinite_scale_raises(scale):
    q, k, pk = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="scale: expected a finite float or None"):
        fastpeft.prefix_attention(q, k, k, pk, pk, scale=scale)


@pytest.mark.parametrize("backend", PREFIX_BACKENDS)
def test_prefix_attention_negative_scale(backend):
    test_prefix_attention.check(backend, 2, 4, 2, 7, 9, 3, 16, 1, torch.float32, causal=True, scale=-0.3)
    test_prefix_attention.check(backend, 2, 4, 2, 7, 9, 3, 16, 2, torch.float32, mask="bool_LS", scale=-0.3)
