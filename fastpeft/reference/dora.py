"""DoRA linear in plain PyTorch, with HF PEFT's conventions (peft 0.21, ``tuners/lora/dora.py``).

``dora_linear_reference`` is the autograd oracle the tests compare every backend with; it is
written the way PEFT computes it:

    norm  = ‖W + s·B·A‖ per output row, DETACHED (no gradient flows through it)
    g     = magnitude / norm                                            (N,)
    y     = base(x) + (g - 1)⊙base_r + g⊙s·(drop(x)·Aᵀ)·Bᵀ
    base_r = base(x) - b          when dropout is off (PEFT reuses the frozen output)
           = drop(x)·Wᵀ           when dropout is on (PEFT sends the dropped input through W too)

``dora_fwd_reference`` / ``dora_bwd_reference`` are the reference backend's explicit kernels
with the signatures every backend shares (contract in ``fastpeft/ops/dora.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft._dropout import dropout_with_seed


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0,
                          seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PEFT's DoRA linear, differentiated by autograd.

    x (..., K); weight (N, K); bias (N,) or None; lora_A (r, K); lora_B (N, r); magnitude (N,).
    Dropout uses fastpeft's counter-based mask for ``seed`` (off when seed is None or p == 0).
    """
    lora_weight = lora_B @ lora_A
    norm = torch.linalg.norm(weight + scaling * lora_weight.detach(), dim=1).to(weight.dtype).detach()
    g = (magnitude / norm).view(1, -1)
    result = F.linear(x, weight, bias)
    if seed is None or dropout_p == 0.0:
        xd = x
        base_r = result - bias if bias is not None else result
    else:
        xd = dropout_with_seed(x, seed, dropout_p)
        base_r = F.linear(xd, weight)
    lora_result = F.linear(F.linear(xd, lora_A), lora_B)
    return result + (g - 1) * base_r + g * lora_result * scaling


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W_n‖² per row (N,), in fp32 for fp16/bf16 weights (accumulated in that dtype)."""
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    w = weight.detach().to(acc)
    return (w * w).sum(1)


def dora_norm(weight, w_sq, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row (N,) without forming the N×K matrix, in w_sq's dtype:

        ‖W_n‖² + 2s·B_n·(W·Aᵀ)_n + s²·B_n·(A·Aᵀ)·B_nᵀ

    from the cached ‖W_n‖² (w_sq), W·Aᵀ (N×r) and A·Aᵀ (r×r). Clamped at 0 before the root
    (rounding can push an exactly cancelling row slightly negative).
    """
    acc = w_sq.dtype
    A, B, W = lora_A.detach().to(acc), lora_B.detach().to(acc), weight.detach().to(acc)
    WA = W @ A.t()                                              # (N, r)
    AA = A @ A.t()                                              # (r, r)
    n2 = w_sq + 2.0 * scaling * (B * WA).sum(1) + scaling * scaling * ((B @ AA) * B).sum(1)
    return n2.clamp_min(0).sqrt()


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def dora_fwd_reference(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling: float, dropout_p: float, seed):
    """x (M, K) -> (y (M, N), t (M, r), norm (N,), v (M, N) or (0,)).

    t = drop(x)·Aᵀ; norm = ‖W + s·B·A‖ (detached, fp32 for half inputs); v = drop(x)·Wᵀ is kept
    for the magnitude gradient only when dropout is on (without dropout backward uses y).
    With g = m / norm:  no dropout  y = x·(g⊙W)ᵀ + b + s·t·(g⊙B)ᵀ
                        dropout     y = x·Wᵀ + b + (g-1)⊙v + s·t·(g⊙B)ᵀ
    """
    acc = w_sq.dtype
    norm = dora_norm(weight, w_sq, lora_A, lora_B, scaling)
    g = (magnitude.to(acc) / norm).to(x.dtype)
    drop = seed is not None and dropout_p > 0.0
    xd = dropout_with_seed(x, seed, dropout_p) if drop else x
    t = F.linear(xd, lora_A)
    Bg = lora_B * g[:, None]
    if drop:
        v = F.linear(xd, weight)
        y = F.linear(x, weight, bias) + (g - 1) * v
    else:
        v = _empty(x)
        y = F.linear(x, weight * g[:, None], bias)
    y = y.addmm_(t, Bg.t(), alpha=scaling)
    return y, t, norm, v


def dm_zero_rows(dm, dy, x, weight, lora_B, t, magnitude, norm, scaling: float):
    """dm for the rows whose magnitude is exactly 0 (there u = (y - b)/g cannot be recovered from
    y): recomputed from u[:, n] = x·W_nᵀ + s·t·B_nᵀ, only for those rows. In place on dm."""
    zero = (magnitude == 0).nonzero().flatten()
    if zero.numel():
        u = F.linear(x, weight[zero]) + scaling * F.linear(t, lora_B[zero])  # (M, #zero)
        dm[zero] = ((dy[:, zero] * u).sum(0) / norm[zero].to(dy.dtype)).to(dm.dtype)
    return dm


def dora_bwd_reference(dy, x, weight, bias, lora_A, lora_B, magnitude, t, norm, yv, scaling: float,
                       dropout_p: float, seed, need_x: bool, need_weight: bool, need_bias: bool, need_mag: bool):
    """dy (M, N) -> (dx (M, K), dW (N, K), db (N,), dA (r, K), dB (N, r), dm (N,)); unneeded ones empty.

    yv is the forward's y without dropout, its v = drop(x)·Wᵀ with dropout. With u the
    un-normalised DoRA output (x·Wᵀ + s·t·Bᵀ, or v + s·t·Bᵀ): dm = Σ_rows dy⊙u / norm.
    """
    g = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    drop = seed is not None and dropout_p > 0.0
    dyg = dy * g                                               # (M, N)
    dt = torch.mm(dyg, lora_B) * scaling                       # (M, r)
    dtB = torch.mm(dy.t(), t) * scaling                        # (N, r) = s·dyᵀ·t
    dB = dtB * g[:, None]
    xd = dropout_with_seed(x, seed, dropout_p) if drop else x
    dA = torch.mm(dt.t(), xd)
    dm = _empty(x)
    if need_mag:
        if drop:  # Σ dy⊙(v + s·t·Bᵀ) = Σ dy⊙v + B_n·(s·dyᵀt)_n
            dm = ((dy * yv).sum(0) + (lora_B * dtB).sum(1)) / norm.to(x.dtype)
        else:     # u = (y - b)/g, so dy⊙u/norm = dy⊙(y - b)/m
            yb = yv - bias if bias is not None else yv
            dm = (dy * yb).sum(0) / magnitude
            dm = dm_zero_rows(dm, dy, x, weight, lora_B, t, magnitude, norm, scaling)
    dx = _empty(x)
    if need_x:
        if drop:  # dx = dy·W + mask/(1-p)⊙((dy⊙(g-1))·W + dt·A)
            dx = torch.mm(dy, weight) + dropout_with_seed(torch.mm(dy * (g - 1), weight) + torch.mm(dt, lora_A),
                                                          seed, dropout_p)
        else:
            dx = torch.mm(dyg, weight) + torch.mm(dt, lora_A)
    dW = _empty(x)
    if need_weight:
        dW = torch.mm(dy.t(), x) + torch.mm((dy * (g - 1)).t(), xd) if drop else torch.mm(dyg.t(), x)
    db = dy.sum(0) if need_bias else _empty(x)
    return dx, dW, db, dA, dB, dm
