"""Bottleneck adapter in plain PyTorch.

``adapter_reference`` is the autograd oracle the tests compare every backend with;
``adapter_fwd_reference`` / ``adapter_bwd_reference`` are the reference backend's explicit
kernels, with the signatures every backend shares (see ``fastpeft/ops/adapter.py`` and the
adapter kernel contract)::

    z = x·Wdᵀ + bd                                   (M, m) pre-activation, saved
    y = R + scale ⊙ (drop(act(z))·Wuᵀ + bu)          (M, d), R = x or the given residual
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastpeft._dropout import dropout_with_seed

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")


def activation_fn(name: str, z: torch.Tensor) -> torch.Tensor:
    """``act(z)`` for one of :data:`ACTIVATIONS` (gelu is the exact erf form)."""
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        # torch's vectorised float32 GELU returns NaN at +inf (its scalar and float64 paths, and
        # the formula, give +inf): keep +inf so the oracle does not depend on the tensor's length
        return torch.where(z == math.inf, z, F.gelu(z))
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "identity":
        return z
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """``act'(z)`` elementwise, written out (not autograd) so backward kernels can mirror it."""
    if name == "relu":
        # 0 where z <= 0, else 1 - also at NaN, as torch's relu backward (threshold_backward) and
        # the C++ backend pass the gradient through there
        return (~(z <= 0)).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "gelu_tanh":
        k0, k1 = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(k0 * (z + k1 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "identity":
        return torch.ones_like(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def adapter_reference(x, down_weight, down_bias, up_weight, up_bias, activation: str = "relu",
                      scaling: Union[float, torch.Tensor] = 1.0, residual: Optional[torch.Tensor] = None,
                      dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``R + scaling·(drop(act(x·Wdᵀ + bd))·Wuᵀ + bu)``, differentiated by autograd.

    x (..., d); down_weight (m, d); down_bias (m,) or None; up_weight (d, m); up_bias (d,) or
    None; scaling a float or a tensor of shape () or (d,); residual (..., d) or None (R = x).
    Dropout uses fastpeft's counter-based mask over the logical (M, m) bottleneck for ``seed``
    (no dropout when seed is None).
    """
    h = activation_fn(activation, F.linear(x, down_weight, down_bias))
    h = dropout_with_seed(h, seed, dropout_p)
    u = F.linear(h, up_weight, up_bias)
    return (x if residual is None else residual) + scaling * u


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def adapter_fwd_reference(x, down_weight, down_bias, up_weight, up_bias, scale, residual,
                          activation: str, dropout_p: float, seed):
    """x (M, d) -> (y (M, d), z (M, m)); scale (d,) (may be a stride-0 view)."""
    z = F.linear(x, down_weight, down_bias)
    h = dropout_with_seed(activation_fn(activation, z), seed, dropout_p)
    u = F.linear(h, up_weight, up_bias)
    y = (x if residual is None else residual) + scale * u
    return y, z


def adapter_bwd_reference(dy, x, down_weight, up_weight, up_bias, z, scale, activation: str,
                          dropout_p: float, seed, residual_is_x: bool, need_x: bool, need_scale: bool):
    """dy (M, d) -> (dx (M, d), dWd (m, d), dbd (m,), dWu (d, m), dbu (d,), dscale (d,)).

    With h = drop(act(z)) recomputed from z and G = dyᵀ·h (d, m), colsum(dy) = s (d,):
    dWu = scale·G, dbu = scale·s, dscale = rowsum(Wu ⊙ G) + bu·s (u is never recomputed),
    dz = drop(dy·(scale·Wu)) ⊙ act'(z), dWd = dzᵀ·x, dbd = colsum(dz), dx = dz·Wd (+ dy).
    Unneeded dx / dscale are returned empty.
    """
    h = dropout_with_seed(activation_fn(activation, z), seed, dropout_p)
    G = torch.mm(dy.t(), h)                                   # (d, m)
    s = dy.sum(0)                                             # (d,)
    d_up_weight = scale[:, None] * G
    d_up_bias = scale * s
    dz = dropout_with_seed(torch.mm(dy, scale[:, None] * up_weight), seed, dropout_p)
    dz = dz * activation_grad(activation, z)                  # (M, m)
    d_down_weight = torch.mm(dz.t(), x)                       # (m, d)
    d_down_bias = dz.sum(0)
    dx = _empty(x)
    if need_x:
        dx = torch.mm(dz, down_weight)
        if residual_is_x:
            dx = dx + dy
    d_scale = _empty(x)
    if need_scale:
        d_scale = (up_weight * G).sum(1)
        if up_bias is not None:
            d_scale = d_scale + up_bias * s
    return dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scale
