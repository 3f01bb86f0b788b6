"""Many LoRA adapters in one batch: ``y[i] = x[i]·Wᵀ + b + s[a]·(drop(x)[i]·A[a]ᵀ)·B[a]ᵀ``, where
``a = adapter_ids[i]`` picks row i's adapter (-1: the base layer only).

Chain: ``MultiLoRALinear`` / ``LoRALinear``'s mixed batch (modules) -> ``MultiLoRALinearFunction``
(autograd) -> ``torch.ops.fastpeft.multi_lora_fwd`` / ``multi_lora_bwd`` (torch.library) -> backend
kernel ``multi_lora_fwd_{triton,cpu,reference}``.

Kernel contract, shared by every backend (2-D x; the Function flattens leading dims and
broadcasts per-sample ids to one id per row):

* ``multi_lora_fwd(x (M,K), weight (N,K), bias (N,)|None, lora_A (n,r,K), lora_B (n,N,r),
  scaling [n floats], adapter_ids (M,) int64 in [-1, n), dropout_p, seed) -> (y (M,N), t (M,r))``
  with ``t[i] = drop(x)[i]·A[a]ᵀ`` (0 for base rows) kept for backward.
* ``multi_lora_bwd(dy (M,N), x, weight, lora_A, lora_B, t, scaling, adapter_ids, dropout_p, seed,
  need_x, need_weight, need_bias) -> (dx (M,K), dW (N,K), db (N,), dA (n,r,K), dB (n,N,r))``;
  every adapter gets its gradient (zeros for adapters without rows); gradients not needed are
  returned as empty tensors.

The frozen GEMM runs once for all rows; only the rank-r work is grouped by adapter. Dropout
masks come from ``fastpeft._dropout`` over the logical (M, K) view of x (the mask a row gets does
not depend on which adapter it runs through) and are regenerated in backward.

Different ranks: the kernels take one rank r for the stack. Adapters of smaller rank are
zero-padded to the largest (:func:`stack_lora_weights`): the padded rows of A / columns of B
contribute exactly zero, and their gradients are dropped by the padding's backward.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft import _dropout
from fastpeft._backend import get_kernel, select_backend
from fastpeft._validate import check_dropout, check_linear, check_scaling, check_tensor
from fastpeft.ops._common import autocast_dtype, cast_all, none_if_empty, run_op

__all__ = ["multi_lora_linear", "MultiLoRALinearFunction", "stack_lora_weights"]


@torch.library.custom_op("fastpeft::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scaling: List[float], adapter_ids: Tensor, dropout_p: float, seed: Optional[Tensor],
                   backend: str) -> Tuple[Tensor, Tensor]:
    return get_kernel("multi_lora", "multi_lora_fwd", backend)(x, weight, bias, lora_A, lora_B, scaling,
                                                               adapter_ids, dropout_p, seed)


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[1])


@torch.library.custom_op("fastpeft::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
                   scaling: List[float], adapter_ids: Tensor, dropout_p: float, seed: Optional[Tensor],
                   need_x: bool, need_weight: bool, need_bias: bool,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("multi_lora", "multi_lora_bwd", backend)(dy, x, weight, lora_A, lora_B, t, scaling,
                                                               adapter_ids, dropout_p, seed, need_x,
                                                               need_weight, need_bias)


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, adapter_ids, dropout_p, seed, need_x, need_weight, need_bias,
      backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[0] if need_bias else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


class MultiLoRALinearFunction(torch.autograd.Function):
    """Autograd for the multi-adapter LoRA linear; x is saved by reference, the mask is regenerated.
    ``adapter_ids`` arrives already flattened to one id per row of the 2-D view of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, backend):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), K)  # not (-1, K): that is ambiguous when K = 0
        y, t = run_op(multi_lora_fwd, x2, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p, seed, backend)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, t, adapter_ids)
        ctx.seed, ctx.scaling, ctx.dropout_p, ctx.backend = seed, scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, t, ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        dy2 = dy.reshape(x2.shape[0], weight.shape[0])
        dx, dW, db, dA, dB = run_op(multi_lora_bwd, dy2, x2, weight, lora_A, lora_B, t, ctx.scaling, ids, ctx.dropout_p,
                                            ctx.seed, need_x, need_w, need_b, ctx.backend)
        dx = dx.view(*dy.shape[:-1], x2.shape[1]) if need_x else None
        return (dx, none_if_empty(dW, need_w), none_if_empty(db, need_b), dA, dB,
                None, None, None, None, None)


def stack_lora_weights(lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Stack n adapters' factors for :func:`multi_lora_linear`, zero-padding smaller ranks.

    Args:
        lora_As: n tensors (r_i, K); lora_Bs: n tensors (N, r_i).
    Returns:
        ``(lora_A (n, r, K), lora_B (n, N, r))`` with ``r = max r_i``; differentiable (each
        adapter's gradient flows back to its own factors, the padding gets none).
    """
    if len(lora_As) != len(lora_Bs) or not lora_As:
        raise ValueError(f"lora_As / lora_Bs: expected the same number (>= 1) of A and B factors, "
                         f"got {len(lora_As)} and {len(lora_Bs)}")
    r = max(a.shape[0] for a in lora_As)
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        check_tensor(f"lora_As[{i}]", a, ndim=2)
        check_tensor(f"lora_Bs[{i}]", b, shape=(None, a.shape[0]))
    A = torch.stack([a if a.shape[0] == r else F.pad(a, (0, 0, 0, r - a.shape[0])) for a in lora_As])
    B = torch.stack([b if b.shape[1] == r else F.pad(b, (0, r - b.shape[1])) for b in lora_Bs])
    return A, B


def _check(x, weight, bias, lora_A, lora_B, adapter_ids):
    K, N = check_linear(x, weight, bias)
    check_tensor("lora_A", lora_A, ndim=3, dtype=x.dtype, device=x.device)
    n, r = lora_A.shape[0], lora_A.shape[1]
    if lora_A.shape[2] != K or r < 1 or n < 1:
        raise ValueError(f"lora_A: expected shape (n, r, {K}) with n >= 1, r >= 1, got {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, shape=(n, N, r), dtype=x.dtype, device=x.device)
    check_tensor("adapter_ids", adapter_ids, dtype=torch.int64, device=x.device, floating=False)
    lead = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) not in (lead, lead[:1]):
        raise ValueError(f"adapter_ids: expected shape {lead} (one id per token) or {lead[:1]} (one per sample), "
                         f"got {tuple(adapter_ids.shape)}")
    if adapter_ids.numel():
        lo, hi = adapter_ids.min().item(), adapter_ids.max().item()
        if lo < -1 or hi >= n:
            raise ValueError(f"adapter_ids: expected ids in [-1, {n}) (n = {n} adapters, -1 = base only), "
                             f"got values in [{lo}, {hi}]")


def _scalings(scaling, n: int) -> List[float]:
    if isinstance(scaling, Tensor) and scaling.dim() == 1:
        if scaling.shape[0] != n:
            raise ValueError(f"scaling: expected a float or a tensor of shape ({n},), got {tuple(scaling.shape)}")
        return [check_scaling(s) for s in scaling.tolist()]
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != n:
            raise ValueError(f"scaling: expected {n} values (one per adapter), got {len(scaling)}")
        return [check_scaling(s) for s in scaling]
    return [check_scaling(scaling)] * n


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scaling: Union[float, Sequence[float], Tensor], adapter_ids: Tensor, dropout_p: float = 0.0,
                      training: bool = False, backend: Optional[str] = None) -> Tensor:
    """Each row of x through its own LoRA adapter, fused: ``x·Wᵀ + b + s[a]·(drop(x)·A[a]ᵀ)·B[a]ᵀ``.

    Args:
        x: (..., K) input, any leading dims, may be non-contiguous.
        weight: (N, K) frozen (or trainable) base weight; bias: (N,) or None.
        lora_A: (n, r, K) the n adapters' A factors; lora_B: (n, N, r) their B factors. One rank r:
            adapters of different ranks are zero-padded to the largest (:func:`stack_lora_weights`).
        scaling: one float for every adapter, or n of them (a list or an (n,) tensor).
        adapter_ids: int64 on x's device, shape ``x.shape[:-1]`` (one adapter per token) or
            ``(x.shape[0],)`` (one per sample, broadcast over the other leading dims); values in
            [-1, n), -1 = the base layer only. Unsorted ids and adapters without rows are fine.
        dropout_p: dropout on the LoRA branch input in [0, 1), applied only when ``training``.
        backend: "triton", "cpu" or "reference"; default: FASTPEFT_BACKEND, else automatic.
    Returns:
        (..., N) output in x's dtype; gradients flow to x, every adapter's A and B, and W / bias
        when they require grad.
    """
    amp = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if amp is not None:
        x, weight, bias, lora_A, lora_B = cast_all(amp, x, weight, bias, lora_A, lora_B)
    _check(x, weight, bias, lora_A, lora_B, adapter_ids)
    scales = _scalings(scaling, lora_A.shape[0])
    p = check_dropout(dropout_p)  # checked in eval mode too
    p = p if training else 0.0
    seed = _dropout.new_seed(p > 0.0)
    be = select_backend("multi_lora", x.device, backend, x.dtype)
    lead = x.shape[:-1]
    ids = adapter_ids
    if ids.dim() != len(lead) or tuple(ids.shape) != tuple(lead):  # per sample: one id for all its tokens
        ids = ids.view(ids.shape[0], *([1] * (len(lead) - 1))).expand(lead)
    ids = ids.reshape(math.prod(lead)).contiguous()
    return MultiLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scales, ids, p, seed, be)
