"""Fused bottleneck adapter: ``y = R + s ⊙ (drop(act(x·Wdᵀ + bd))·Wuᵀ + bu)``.

``R = x`` for a sequential adapter (Houlsby / Pfeiffer), or the given ``residual`` for a
parallel one (AdaptFormer: the sublayer output the adapter branch is added to).

Chain: ``Adapter`` / ``ParallelAdapter`` (modules) -> ``AdapterFunction`` (autograd) ->
``torch.ops.fastpeft.adapter_fwd`` / ``adapter_bwd`` (torch.library) -> backend kernel
``adapter_fwd_{triton,cpu,reference}``.

Kernel contract, shared by every backend (2-D inputs; the Function flattens leading dims):

* ``adapter_fwd(x (M,d), down_weight (m,d), down_bias (m,)|None, up_weight (d,m),
  up_bias (d,)|None, scale (d,), residual (M,d)|None, activation, dropout_p, seed)
  -> (y (M,d), z (M,m))`` with the pre-activation ``z = x·Wdᵀ + bd`` kept for backward.
* ``adapter_bwd(dy (M,d), x, down_weight, up_weight, up_bias|None, z, scale (d,), activation,
  dropout_p, seed, residual_is_x, need_x, need_scale) -> (dx (M,d), d_down_weight (m,d),
  d_down_bias (m,), d_up_weight (d,m), d_up_bias (d,), d_scale (d,))``; unneeded dx /
  d_scale are empty tensors. The residual's gradient (dy) is handled here, not in kernels.

``scale`` is always a (d,) tensor of x's dtype: a float or 0-dim scaling is expanded with
``.expand(d)`` (stride 0), and the Function sums d_scale back to the user's shape.
Dropout acts on act(z) as a logical (M, m) matrix, with masks from ``fastpeft._dropout``
regenerated in backward, never stored.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from fastpeft import _dropout
from fastpeft._backend import get_kernel, select_backend
from fastpeft._validate import FLOAT_DTYPES, check_dropout, check_optional, check_scaling, check_tensor
from fastpeft.ops._common import autocast_dtype, cast_all, none_if_empty, run_op
from fastpeft.reference.adapter import ACTIVATIONS


@torch.library.custom_op("fastpeft::adapter_fwd", mutates_args=())
def adapter_fwd(x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
                up_bias: Optional[Tensor], scale: Tensor, residual: Optional[Tensor], activation: str,
                dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    return get_kernel("adapter", "adapter_fwd", backend)(x, down_weight, down_bias, up_weight, up_bias, scale,
                                                         residual, activation, dropout_p, seed)


@adapter_fwd.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, scale, residual, activation, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], x.shape[1]), x.new_empty(x.shape[0], down_weight.shape[0])


@torch.library.custom_op("fastpeft::adapter_bwd", mutates_args=())
def adapter_bwd(dy: Tensor, x: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Optional[Tensor],
                z: Tensor, scale: Tensor, activation: str, dropout_p: float, seed: Optional[Tensor],
                residual_is_x: bool, need_x: bool, need_scale: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("adapter", "adapter_bwd", backend)(dy, x, down_weight, up_weight, up_bias, z, scale,
                                                         activation, dropout_p, seed, residual_is_x, need_x,
                                                         need_scale)


@adapter_bwd.register_fake
def _(dy, x, down_weight, up_weight, up_bias, z, scale, activation, dropout_p, seed, residual_is_x, need_x,
      need_scale, backend):
    m, d = down_weight.shape
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), x.new_empty(m, d), x.new_empty(m),
            x.new_empty(d, m), x.new_empty(d), x.new_empty(d) if need_scale else x.new_empty(0))


class AdapterFunction(torch.autograd.Function):
    """Autograd for the fused adapter; saves x and z (M, m), regenerates act and the mask.

    ``scale_t`` is the user's scaling tensor (shape () or (d,)) or None for a float
    ``scaling``; its gradient is returned in its own shape.
    """

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, scale_t, scaling, residual, activation,
                dropout_p, seed, backend):
        lead, d = x.shape[:-1], x.shape[-1]
        M = math.prod(lead)
        x2 = x.reshape(M, d)  # not (-1, d): that is ambiguous when d = 0
        if scale_t is None:
            scale = x.new_full((), scaling).expand(d)
        else:
            scale = scale_t.expand(d) if scale_t.dim() == 0 else scale_t
        r2 = None if residual is None else residual.reshape(M, d)
        y, z = run_op(adapter_fwd, x2, down_weight, down_bias, up_weight, up_bias, scale, r2, activation, dropout_p,
                           seed, backend)
        ctx.save_for_backward(x2, down_weight, up_weight, up_bias, z, scale)
        ctx.activation, ctx.dropout_p, ctx.seed, ctx.backend = activation, dropout_p, seed, backend
        ctx.residual_is_x = residual is None
        ctx.has_down_bias, ctx.has_up_bias = down_bias is not None, up_bias is not None
        ctx.scale_dim = None if scale_t is None else scale_t.dim()
        return y.view(*lead, d)

    @staticmethod
    def backward(ctx, dy):
        x2, down_weight, up_weight, up_bias, z, scale = ctx.saved_tensors
        nig = ctx.needs_input_grad
        # x's gradient is needed for x itself; with R = x it also carries dy.
        need_x = nig[0]
        need_scale = ctx.scale_dim is not None and nig[5]
        d = x2.shape[1]
        dy2 = dy.reshape(x2.shape[0], d)
        dx, dWd, dbd, dWu, dbu, ds = run_op(adapter_bwd, dy2, x2, down_weight, up_weight, up_bias, z, scale,
                                                 ctx.activation, ctx.dropout_p, ctx.seed, ctx.residual_is_x,
                                                 need_x, need_scale, ctx.backend)
        dx = dx.view(*dy.shape[:-1], d) if need_x else None
        if need_scale:
            ds = ds.sum().reshape(()) if ctx.scale_dim == 0 else ds
        else:
            ds = None
        dres = dy if (not ctx.residual_is_x and nig[7]) else None
        return (dx, dWd if nig[1] else None, dbd if (ctx.has_down_bias and nig[2]) else None,
                dWu if nig[3] else None, dbu if (ctx.has_up_bias and nig[4]) else None,
                ds, None, dres, None, None, None, None)


def _check(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    check_tensor("x", x, min_ndim=1)
    d = x.shape[-1]
    check_tensor("down_weight", down_weight, ndim=2, dtype=x.dtype, device=x.device)
    m = down_weight.shape[0]
    if down_weight.shape[1] != d or m < 1:
        raise ValueError(f"down_weight: expected shape (m, {d}) with m >= 1 to match x's last dim, "
                         f"got {tuple(down_weight.shape)}")
    check_optional("down_bias", down_bias, shape=(m,), dtype=x.dtype, device=x.device)
    check_tensor("up_weight", up_weight, shape=(d, m), dtype=x.dtype, device=x.device)
    check_optional("up_bias", up_bias, shape=(d,), dtype=x.dtype, device=x.device)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(scaling, Tensor):
        if scaling.dim() not in (0, 1) or (scaling.dim() == 1 and scaling.shape[0] != d):
            raise ValueError(f"scaling: expected a float or a tensor of shape () or ({d},), "
                             f"got a tensor of shape {tuple(scaling.shape)}")
        check_tensor("scaling", scaling, dtype=x.dtype, device=x.device)
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling: expected a float or a tensor of shape () or ({d},), "
                         f"got {type(scaling).__name__}")
    else:
        check_scaling(scaling, allow_inf=True)
    check_optional("residual", residual, shape=tuple(x.shape), dtype=x.dtype, device=x.device)


def adapter(x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
            up_bias: Optional[Tensor], activation: str = "relu", scaling: Union[float, Tensor] = 1.0,
            residual: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = False,
            backend: Optional[str] = None) -> Tensor:
    """Fused bottleneck adapter ``R + scaling·(drop(act(x·Wdᵀ + bd))·Wuᵀ + bu)``.

    Args:
        x: (..., d) input, any leading dims, may be non-contiguous.
        down_weight: (m, d); down_bias: (m,) or None - the ``nn.Linear(d, m)`` layout.
        up_weight: (d, m); up_bias: (d,) or None - the ``nn.Linear(m, d)`` layout.
        activation: "relu", "gelu" (exact erf), "gelu_tanh", "silu" or "identity".
        scaling: a float (not NaN; ±inf gives what the reference gives), or a tensor of shape ()
            or (d,) (learnable: it gets a gradient).
        residual: (..., d) like x, or None. None: ``R = x`` (sequential adapter); else ``R =
            residual`` (parallel adapter), which gets the gradient dy.
        dropout_p: dropout on the bottleneck activation in [0, 1) (checked always), applied only
            when ``training``.
        backend: "triton", "cpu" or "reference"; default: FASTPEFT_BACKEND, else automatic.
    Returns:
        (..., d) output in x's dtype (fp32 accumulation for fp16/bf16).
    """
    amp = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if amp is not None and isinstance(x, Tensor) and x.dtype in FLOAT_DTYPES:
        x, down_weight, down_bias, up_weight, up_bias, residual = cast_all(
            amp, x, down_weight, down_bias, up_weight, up_bias, residual)
        if isinstance(scaling, Tensor) and scaling.is_floating_point():
            scaling = scaling.to(amp)
    _check(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual)
    p = check_dropout(dropout_p)  # checked in eval mode too
    p = p if training else 0.0
    seed = _dropout.new_seed(p > 0.0)
    be = select_backend("adapter", x.device, backend, x.dtype)
    scale_t = scaling if isinstance(scaling, Tensor) else None
    s = 1.0 if scale_t is not None else float(scaling)
    return AdapterFunction.apply(x, down_weight, down_bias, up_weight, up_bias, scale_t, s, residual,
                                 activation, p, seed, be)
