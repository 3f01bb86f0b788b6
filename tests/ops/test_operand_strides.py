"""Every operand of every op in every memory layout, on every backend, vs the float64 oracle.

Each case passes ONE operand as a non-contiguous view holding the same values as a contiguous
tensor (the others contiguous), so a kernel that ignores that operand's strides reads the wrong
elements (or, for an expanded stride-0 view, past its storage):

* ``sliced``     - every other element of the last dim (``buf[..., ::2]``);
* ``transposed`` - a transposed buffer viewed back (column-major 2-D, or (B, T, heads, D) viewed
  (B, heads, T, D) for attention);
* ``expanded``   - stride 0 along the first dim (a broadcast row / batch; for 1-D, one value).

Storage a wrong stride would reach holds NaN (the skipped elements of ``sliced``, the rows after
the real one of ``expanded``), so such a read fails loudly instead of finding plausible numbers.

Outputs and the gradients of every operand (taken w.r.t. the views) are compared with the oracle
on contiguous float64 copies. The triton cases run through TRITON_INTERPRET=1 on CPU (tiny
shapes) or on CUDA when there is a GPU (marked ``gpu``).
"""
import math

import pytest
import torch

import fastpeft
from fastpeft.reference.adapter import adapter_reference
from fastpeft.reference.lora import lora_linear_reference
from fastpeft.reference.prefix_attention import prefix_attention_reference
from fastpeft.testing import assert_close
from tests.conftest import backend_params, device_for

LAYOUTS = ["sliced", "transposed", "expanded"]


def as_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A view in ``layout`` holding ``values`` (which must be constant along dim 0 for "expanded")."""
    if layout == "sliced":
        buf = torch.full((*values.shape[:-1], 2 * values.shape[-1]), float("nan"), dtype=values.dtype,
                         device=values.device)
        buf[..., ::2] = values
        out = buf[..., ::2]
    elif layout == "transposed":
        if values.dim() == 4:  # (B, heads, T, D) from a (B, T, heads, D) buffer
            out = values.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            out = values.t().contiguous().t()
    elif layout == "expanded":  # its storage: the one real row, then NaN rows a wrong stride would read
        buf = torch.full(values.shape, float("nan"), dtype=values.dtype, device=values.device)
        buf[:1] = values[:1]
        out = buf[:1].expand(values.shape)
        assert out.stride(0) == 0
    else:
        raise AssertionError(layout)
    assert not out.is_contiguous() and torch.equal(out, values)
    return out


def _values(shape, g, layout, scale=1.0):
    v = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    if layout == "expanded":
        v = v[:1].expand(shape).clone()  # constant along dim 0, so a stride-0 view can hold it
    return v


def _run(fn, ref_fn, names, values, view_index, layout, backend, dtype=torch.float32, grad_scale=1.0):
    """fn(*tensors) on ``backend`` with tensor ``view_index`` given as a ``layout`` view; compare
    the output and every gradient (w.r.t. the tensors as passed) with ref_fn on float64 copies."""
    device = device_for(backend)
    ts = []
    for i, v in enumerate(values):
        if v is None:
            ts.append(None)
            continue
        t = v.to(device=device, dtype=dtype)
        if i == view_index:
            t = as_layout(t, layout)
        assert t.is_leaf  # a view of a tensor that needs no grad: a leaf, so it can require grad itself
        ts.append(t.requires_grad_())
    y = fn(*ts)
    ref = [None if v is None else v.clone().requires_grad_() for v in values]
    y_ref = ref_fn(*ref)
    assert_close(y, y_ref, dtype, f"out ({names[view_index]} {layout})")
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y.backward(dy.to(device=device, dtype=dtype))
    y_ref.backward(dy)
    for name, t, r in zip(names, ts, ref):
        if t is None:
            continue
        assert t.grad is not None, f"{name} got no gradient"
        assert_close(t.grad, r.grad, dtype, f"d{name} ({names[view_index]} {layout})", scale=grad_scale)


def _cases(names, ndims):
    return [pytest.param(i, layout, id=f"{name}-{layout}") for i, name in enumerate(names) for layout in LAYOUTS
            if not (layout == "transposed" and ndims[i] == 1)]


# --- LoRA ---------------------------------------------------------------------------------
LORA_NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


@pytest.mark.parametrize("backend", backend_params("lora"))
@pytest.mark.parametrize("index,layout", _cases(LORA_NAMES, [2, 2, 1, 2, 2]))
def test_lora_operand_layouts(backend, index, layout):
    M, K, N, r = 7, 40, 33, 5
    g = torch.Generator().manual_seed(11 + index)
    shapes = [(M, K), (N, K), (N,), (r, K), (N, r)]
    scales = [1.0, K ** -0.5, 1.0, K ** -0.5, r ** -0.5]
    values = [_values(s, g, layout if i == index else "plain", sc) for i, (s, sc) in enumerate(zip(shapes, scales))]

    def fn(x, W, b, A, B):
        torch.manual_seed(7)
        return fastpeft.lora_linear(x, W, b, A, B, 0.6, dropout_p=0.2, training=True, backend=backend)

    def ref_fn(x, W, b, A, B):
        torch.manual_seed(7)
        from fastpeft import _dropout

        return lora_linear_reference(x, W, b, A, B, 0.6, 0.2, _dropout.new_seed(True))

    _run(fn, ref_fn, LORA_NAMES, values, index, layout, backend)


# --- adapter ------------------------------------------------------------------------------
ADAPTER_NAMES = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "scaling", "residual"]


@pytest.mark.parametrize("backend", backend_params("adapter"))
@pytest.mark.parametrize("index,layout", _cases(ADAPTER_NAMES, [2, 2, 1, 2, 1, 1, 2]))
def test_adapter_operand_layouts(backend, index, layout):
    M, d, m = 9, 40, 6
    g = torch.Generator().manual_seed(23 + index)
    shapes = [(M, d), (m, d), (m,), (d, m), (d,), (d,), (M, d)]
    scales = [1.0, d ** -0.5, 1.0, m ** -0.5, 0.5, 1.0, 1.0]
    values = [_values(s, g, layout if i == index else "plain", sc) for i, (s, sc) in enumerate(zip(shapes, scales))]

    def fn(x, Wd, bd, Wu, bu, s, R):
        torch.manual_seed(7)
        return fastpeft.adapter(x, Wd, bd, Wu, bu, "gelu", s, R, dropout_p=0.25, training=True, backend=backend)

    def ref_fn(x, Wd, bd, Wu, bu, s, R):
        torch.manual_seed(7)
        from fastpeft import _dropout

        return adapter_reference(x, Wd, bd, Wu, bu, "gelu", s, R, 0.25, _dropout.new_seed(True))

    _run(fn, ref_fn, ADAPTER_NAMES, values, index, layout, backend)


# --- prefix attention ----------------------------------------------------------------------
PA_NAMES = ["q", "k", "v", "prefix_k", "prefix_v"]


@pytest.mark.parametrize("backend", backend_params("prefix_attention"))
@pytest.mark.parametrize("index,layout", _cases(PA_NAMES, [4] * 5))
def test_prefix_attention_operand_layouts(backend, index, layout):
    B, H, Hkv, L, S, P, D = 2, 4, 2, 9, 11, 5, 16
    Bp = B  # per-sample prefixes, so an expanded prefix is a real stride-0 batch view
    g = torch.Generator().manual_seed(31 + index)
    shapes = [(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D), (Bp, Hkv, P, D), (Bp, Hkv, P, D)]
    values = [_values(s, g, layout if i == index else "plain") for i, s in enumerate(shapes)]
    sc = 1 / math.sqrt(D)

    def fn(q, k, v, pk, pv):
        return fastpeft.prefix_attention(q, k, v, pk, pv, is_causal=True, backend=backend)

    def ref_fn(q, k, v, pk, pv):
        return prefix_attention_reference(q, k, v, pk, pv, is_causal=True, scale=sc)

    _run(fn, ref_fn, PA_NAMES, values, index, layout, backend)
