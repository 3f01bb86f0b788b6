"""Multi-adapter LoRA linear in plain PyTorch: every row of the batch through its own adapter.

``multi_lora_linear_reference`` is the autograd oracle the tests compare every backend with (a
loop over adapters, each applied to its rows, the way HF PEFT runs ``adapter_names=``);
``multi_lora_fwd_reference`` / ``multi_lora_bwd_reference`` are the reference backend's explicit
kernels, with the signatures every backend shares (see ``fastpeft/ops/multi_lora.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastpeft._dropout import dropout_with_seed


def multi_lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: Sequence[float], adapter_ids,
                                dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y[i] = x[i]·Wᵀ + b + s[a]·(drop(x)[i]·A[a]ᵀ)·B[a]ᵀ`` with ``a = adapter_ids[i]`` (none if -1).

    x (..., K); weight (N, K); bias (N,) or None; lora_A (n, r, K); lora_B (n, N, r);
    scaling: n floats; adapter_ids: int64 of shape x.shape[:-1]. Dropout uses fastpeft's
    counter-based mask over the logical (rows, K) view of x (no dropout when seed is None).
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ids = adapter_ids.reshape(-1)
    xd = dropout_with_seed(x2, seed, dropout_p)
    y = F.linear(x2, weight, bias)
    for a in range(lora_A.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        upd = scaling[a] * F.linear(F.linear(xd.index_select(0, rows), lora_A[a]), lora_B[a])
        y = y.index_add(0, rows, upd)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def multi_lora_fwd_reference(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p: float, seed):
    """x (M, K), adapter_ids (M,) -> (y (M, N), t (M, r)), t[i] = drop(x)[i]·A[ids[i]]ᵀ (0 for id -1)."""
    M, r = x.shape[0], lora_A.shape[1]
    xd = dropout_with_seed(x, seed, dropout_p)
    y = F.linear(x, weight, bias)
    t = x.new_zeros(M, r)
    for a in range(lora_A.shape[0]):
        rows = (adapter_ids == a).nonzero().squeeze(1)
        ta = F.linear(xd.index_select(0, rows), lora_A[a])
        t.index_copy_(0, rows, ta)
        y.index_add_(0, rows, F.linear(ta, lora_B[a]), alpha=scaling[a])
    return y, t


def multi_lora_bwd_reference(dy, x, weight, lora_A, lora_B, t, scaling, adapter_ids, dropout_p: float, seed,
                             need_x: bool, need_weight: bool, need_bias: bool):
    """dy (M, N) -> (dx (M, K), dW (N, K), db (N,), dA (n, r, K), dB (n, N, r)); unneeded ones empty."""
    xd = dropout_with_seed(x, seed, dropout_p)
    dA, dB = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dxl = torch.zeros_like(x) if need_x else None
    for a in range(lora_A.shape[0]):
        rows = (adapter_ids == a).nonzero().squeeze(1)
        dya = dy.index_select(0, rows)
        dta = torch.mm(dya, lora_B[a]) * scaling[a]                   # (Ma, r)
        dB[a] = torch.mm(dya.t(), t.index_select(0, rows)) * scaling[a]
        dA[a] = torch.mm(dta.t(), xd.index_select(0, rows))
        if need_x:
            dxl.index_copy_(0, rows, torch.mm(dta, lora_A[a]))
    dx = _empty(x)
    if need_x:
        dx = torch.mm(dy, weight) + dropout_with_seed(dxl, seed, dropout_p)
    dW = torch.mm(dy.t(), x) if need_weight else _empty(x)
    db = dy.sum(0) if need_bias else _empty(x)
    return dx, dW, db, dA, dB
