"""NaN and ±inf inputs: every backend gives what the reference backend gives, per activation.

One non-finite value is planted in one operand (for the adapter: one down-bias entry, so one
bottleneck column of z is NaN/±inf for every row, or one element of x, so one row of z is), with
and without dropout, and the output and every gradient must have the same NaN, +inf and -inf
positions as the reference backend's, and close finite values. The reference backend's forward
is checked the same way against the autograd oracle in float64.

What this pins down (each was wrong in the triton kernels): ReLU keeps NaN (``relu(nan) = nan``,
not ``max(nan, 0) = 0``) and passes the gradient through at NaN (torch's relu backward);
dropout multiplies by the 0/1 mask (a dropped NaN/inf gives NaN, as ``x * keep`` does) instead
of selecting zeros; padded bottleneck columns (``x·0`` = NaN for x = ±inf) never reach the
up-projection.
"""
import itertools
import math

import pytest
import torch

import fastpeft
from fastpeft.reference.adapter import ACTIVATIONS, adapter_reference
from fastpeft.reference.lora import lora_linear_reference
from tests.conftest import backend_params, device_for

VALUES = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"), pytest.param(-math.inf, id="-inf")]
DROPOUT = [pytest.param(0.0, id="p0"), pytest.param(0.5, id="p0.5")]


def same_nonfinite(a, b, name):
    """Same NaN / +inf / -inf positions, and the finite entries close."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, name
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        fa, fb = f(a), f(b)
        assert torch.equal(fa, fb), f"{name}: {f.__name__} at {int(fa.sum())} vs {int(fb.sum())} positions"
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _others(family):
    return [p for p in backend_params(family) if p.values[0] != "reference"]


# --- adapter ------------------------------------------------------------------------------
ADAPTER_GRADS = ["dx", "ddown_weight", "ddown_bias", "dup_weight", "dup_bias"]


def _adapter(backend, base, activation, p, dy):
    device = device_for(backend)
    ts = [t.detach().clone().to(device).requires_grad_() for t in base]  # fresh leaves per run
    torch.manual_seed(5)  # the dropout seed the op draws
    y = fastpeft.adapter(*ts, activation, 0.7, dropout_p=p, training=p > 0, backend=backend)
    y.backward(dy.to(device))
    return [y] + [t.grad for t in ts]


def _adapter_inputs(where, value):
    M, d, m = 9, 24, 8
    g = torch.Generator().manual_seed(1)
    x, Wd, bd, Wu, bu, dy = (torch.randn(*s, generator=g) for s in ((M, d), (m, d), (m,), (d, m), (d,), (M, d)))
    if where == "down_bias":
        bd[3] = value
    else:
        x[2, 5] = value
    return [x, Wd, bd, Wu, bu], dy


@pytest.mark.parametrize("backend", _others("adapter"))
@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("where", ["down_bias", "x"])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_nonfinite_follows_reference(backend, activation, value, where, p, request):
    if backend == "cpu" and activation == "gelu" and (value == math.inf or (where == "x" and math.isinf(value))):
        request.applymarker(pytest.mark.xfail(
            reason="C++ backend: at::gelu's vectorised float32 path gives gelu(+inf) = NaN; the reference "
                   "keeps +inf (fastpeft.reference.adapter.activation_fn)", strict=False))
    if backend == "triton" and device_for(backend) == "cuda" and math.isinf(value):
        request.applymarker(pytest.mark.xfail(
            reason="GPU fp32 dots in tf32x3 split ±inf into a tf32 part and a NaN remainder "
                   "(fastpeft/triton/adapter.py docstring)", strict=False))
    base, dy = _adapter_inputs(where, value)
    ref = _adapter("reference", base, activation, p, dy)
    got = _adapter(backend, base, activation, p, dy)
    for name, a, b in zip(["y"] + ADAPTER_GRADS, got, ref):
        same_nonfinite(a, b, f"{name} ({backend} vs reference)")


@pytest.mark.parametrize("where", ["down_bias", "x"])
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_reference_backend_nonfinite_matches_oracle(activation, value, where):
    """The reference backend's output against the autograd oracle in float64 (``torch.relu(nan)``
    is NaN, ``gelu(+inf)`` is +inf, ...), so the backends above are held to torch's semantics."""
    base, dy = _adapter_inputs(where, value)
    y = _adapter("reference", base, activation, 0.0, dy)[0]
    y_ref = adapter_reference(*(t.double() for t in base), activation, 0.7)
    same_nonfinite(y, y_ref, "y (reference backend vs oracle)")


def test_relu_nan_forward_and_gradient():
    """relu(nan) = nan, and the gradient at NaN passes through, as ``torch.relu`` does."""
    from fastpeft.reference.adapter import activation_fn, activation_grad

    z = torch.tensor([math.nan, -1.0, 0.0, 2.0, math.inf, -math.inf], dtype=torch.float64, requires_grad=True)
    torch.relu(z).backward(torch.ones_like(z))
    assert torch.equal(activation_grad("relu", z.detach()), z.grad)
    assert torch.isnan(activation_fn("relu", z.detach())[0])


# --- LoRA ---------------------------------------------------------------------------------
LORA_NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


def _lora(backend, base, p, dy):
    device = device_for(backend)
    ts = [t.detach().clone().to(device).requires_grad_() for t in base]  # fresh leaves per run
    torch.manual_seed(5)
    y = fastpeft.lora_linear(*ts, 0.5, dropout_p=p, training=p > 0, backend=backend)
    y.backward(dy.to(device))
    return [y] + [t.grad for t in ts]


def _lora_inputs(where, value):
    M, K, N, r = 9, 24, 20, 4
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(*s, generator=g) for s in ((M, K), (N, K), (N,), (r, K), (N, r), (M, N))]
    at = {"x": (2, 5), "weight": (3, 4), "bias": (3,), "lora_A": (1, 5), "lora_B": (3, 1)}[where]
    ts[LORA_NAMES.index(where)][at] = value
    return ts[:5], ts[5]


@pytest.mark.parametrize("backend", _others("lora"))
@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("where", LORA_NAMES)
@pytest.mark.parametrize("value", VALUES)
def test_lora_nonfinite_follows_reference(backend, value, where, p, request):
    base, dy = _lora_inputs(where, value)
    ref = _lora("reference", base, p, dy)
    got = _lora(backend, base, p, dy)
    for name, a, b in zip(["y"] + [f"d{n}" for n in LORA_NAMES], got, ref):
        same_nonfinite(a, b, f"{name} ({backend} vs reference)")


@pytest.mark.parametrize("where,value", list(itertools.product(LORA_NAMES, [math.nan, math.inf])))
def test_lora_reference_backend_nonfinite_matches_oracle(where, value):
    base, dy = _lora_inputs(where, value)
    y = _lora("reference", base, 0.0, dy)[0]
    same_nonfinite(y, lora_linear_reference(*(t.double() for t in base), 0.5), "y (reference backend vs oracle)")
