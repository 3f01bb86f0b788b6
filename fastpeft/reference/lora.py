"""LoRA linear in plain PyTorch.

``lora_linear_reference`` is the autograd oracle the tests compare every backend with;
``lora_fwd_reference`` / ``lora_bwd_reference`` are the reference backend's explicit
kernels, with the signatures every backend shares (see ``fastpeft/ops/lora.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastpeft._dropout import dropout_with_seed


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                          seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``, differentiated by autograd.

    x (..., K); weight (N, K); bias (N,) or None; lora_A (r, K); lora_B (N, r).
    Dropout uses fastpeft's counter-based mask for ``seed`` (no dropout when seed is None).
    """
    xd = dropout_with_seed(x, seed, dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(xd, lora_A), lora_B)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def lora_fwd_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """x (M, K) -> (y (M, N), t (M, r)) with t = drop(x)·Aᵀ saved for backward."""
    t = F.linear(dropout_with_seed(x, seed, dropout_p), lora_A)
    y = F.linear(x, weight, bias)
    y.addmm_(t, lora_B.t(), alpha=scaling)
    return y, t


def lora_bwd_reference(dy, x, weight, lora_A, lora_B, t, scaling: float, dropout_p: float, seed,
                       need_x: bool, need_weight: bool, need_bias: bool):
    """dy (M, N) -> (dx (M, K), dW (N, K), db (N,), dA (r, K), dB (N, r)); unneeded ones empty."""
    dt = torch.mm(dy, lora_B) * scaling                        # (M, r)
    dB = torch.mm(dy.t(), t) * scaling                         # (N, r)
    dA = torch.mm(dt.t(), dropout_with_seed(x, seed, dropout_p))  # (r, K)
    dx = _empty(x)
    if need_x:
        dx = torch.mm(dy, weight) + dropout_with_seed(torch.mm(dt, lora_A), seed, dropout_p)
    dW = torch.mm(dy.t(), x) if need_weight else _empty(x)
    db = dy.sum(0) if need_bias else _empty(x)
    return dx, dW, db, dA, dB
