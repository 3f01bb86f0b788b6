"""Fused DoRA linear (weight-decomposed LoRA) with HF PEFT's conventions.

    norm = ‖W + s·B·A‖ per output row (detached), g = magnitude / norm        (N,)
    y    = x·Wᵀ + b + (g-1)⊙base_r + g⊙s·(drop(x)·Aᵀ)·Bᵀ
    base_r = x·Wᵀ without dropout (PEFT reuses the frozen output), drop(x)·Wᵀ with dropout

Chain: ``LoRALinear(use_dora=True)`` (module) -> ``DoRALinearFunction`` (autograd) ->
``torch.ops.fastpeft.dora_fwd`` / ``dora_bwd`` (torch.library) -> backend kernel
``dora_fwd_{triton,cpu,reference}``.

Kernel contract, shared by every backend (2-D inputs; the Function flattens leading dims):

* ``dora_fwd(x (M,K), weight (N,K), bias (N,)|None, lora_A (r,K), lora_B (N,r), magnitude (N,),
  w_sq (N,), scaling, dropout_p, seed) -> (y (M,N), t (M,r), norm (N,), v)``: ``w_sq`` = ‖W_n‖²
  (fp32 for half inputs; cached here per weight version, so the norm never touches an N×K
  matrix: it comes from w_sq, W·Aᵀ (N×r) and A·Aᵀ (r×r)); ``t = drop(x)·Aᵀ``; ``norm`` in
  w_sq's dtype; ``v = drop(x)·Wᵀ`` (M,N) with dropout, else empty.
* ``dora_bwd(dy, x, weight, bias, lora_A, lora_B, magnitude, t, norm, yv, scaling, dropout_p,
  seed, need_x, need_weight, need_bias, need_mag) -> (dx, dW, db, dA, dB, dm)`` with ``yv`` the
  forward's y (no dropout: the magnitude gradient is Σ dy⊙(y-b)/m, so nothing M×N is kept
  beyond the output itself) or v (dropout); unneeded gradients are empty tensors.

Dropout masks come from ``fastpeft._dropout`` (identical on every backend), regenerated in
backward, never stored.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastpeft import _dropout
from fastpeft._backend import get_kernel, select_backend
from fastpeft._validate import check_dropout, check_scaling, check_tensor
from fastpeft.ops._common import autocast_dtype, cast_all, none_if_empty, run_op
from fastpeft.ops.lora import _check as _check_lora
from fastpeft.reference.dora import weight_sq_norm


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.custom_op("fastpeft::dora_fwd", mutates_args=())
def dora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             w_sq: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("dora", "dora_fwd", backend)(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling,
                                                   dropout_p, seed)


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed, backend):
    M, N = x.shape[0], weight.shape[0]
    v = x.new_empty(M, N) if (seed is not None and dropout_p > 0.0) else x.new_empty(0)
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0]), w_sq.new_empty(N), v


@torch.library.custom_op("fastpeft::dora_bwd", mutates_args=())
def dora_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             magnitude: Tensor, t: Tensor, norm: Tensor, yv: Tensor, scaling: float, dropout_p: float,
             seed: Optional[Tensor], need_x: bool, need_weight: bool, need_bias: bool, need_mag: bool,
             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("dora", "dora_bwd", backend)(dy, x, weight, bias, lora_A, lora_B, magnitude, t, norm, yv,
                                                   scaling, dropout_p, seed, need_x, need_weight, need_bias,
                                                   need_mag)


@dora_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, magnitude, t, norm, yv, scaling, dropout_p, seed, need_x, need_weight,
      need_bias, need_mag, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[0] if need_bias else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
            magnitude.new_empty(magnitude.shape[0] if need_mag else 0))


# ‖W_n‖² per weight, reused while the weight is unchanged: keyed by the identity of the tensor that
# owns the storage (a transposed view, e.g. GPT-2's Conv1D weight, is a new object on every call)
# and the view's geometry, and checked against the version counter (an optimizer step or a load
# bumps it) and the storage address.
_WSQ: dict = {}
_WSQ_MAX = 512


def cached_weight_sq(weight: Tensor) -> Tensor:
    """‖W_n‖² (N,) of ``weight`` (fp32 for half weights), cached per weight version."""
    if torch.compiler.is_compiling() or weight.device.type == "meta":
        return weight_sq_norm(weight)
    root = weight._base if weight._base is not None else weight
    key = (id(root), tuple(weight.shape), weight.stride(), weight.storage_offset())
    stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    hit = _WSQ.get(key)
    if hit is not None and hit[0]() is root and hit[1] == stamp:
        return hit[2]
    with torch.no_grad():
        w_sq = weight_sq_norm(weight)
    if len(_WSQ) >= _WSQ_MAX:
        _WSQ.clear()
    _WSQ[key] = (weakref.ref(root), stamp, w_sq)
    return w_sq


class DoRALinearFunction(torch.autograd.Function):
    """Autograd for the fused DoRA linear: x by reference, y (or v with dropout), t and the
    norm are saved; the dropout mask is regenerated."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed, backend):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), K)
        y, t, norm, v = run_op(dora_fwd, x2, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed,
                                 backend)
        drop = seed is not None and dropout_p > 0.0
        # Without dropout the magnitude gradient comes from y itself (same storage as the output).
        ctx.save_for_backward(x2, weight, bias, lora_A, lora_B, magnitude, t, norm, v if drop else y)
        ctx.seed, ctx.scaling, ctx.dropout_p, ctx.backend = seed, scaling, dropout_p, backend
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, lora_A, lora_B, magnitude, t, norm, yv = ctx.saved_tensors
        nig = ctx.needs_input_grad
        need_x, need_w, need_b, need_m = nig[0], nig[1], bias is not None and nig[2], nig[5]
        dy2 = dy.reshape(x2.shape[0], weight.shape[0])
        dx, dW, db, dA, dB, dm = run_op(dora_bwd, dy2, x2, weight, bias, lora_A, lora_B, magnitude, t, norm, yv,
                                          ctx.scaling, ctx.dropout_p, ctx.seed, need_x, need_w, need_b, need_m,
                                          ctx.backend)
        dx = dx.view(*dy.shape[:-1], x2.shape[1]) if need_x else None
        return (dx, none_if_empty(dW, need_w), none_if_empty(db, need_b), dA, dB, none_if_empty(dm, need_m),
                None, None, None, None, None)


def _check(x, weight, bias, lora_A, lora_B, magnitude):
    _check_lora(x, weight, bias, lora_A, lora_B)
    check_tensor("magnitude", magnitude, shape=(weight.shape[0],), dtype=x.dtype, device=x.device)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None) -> Tensor:
    """Fused DoRA linear, numerically HF PEFT's ``use_dora=True`` layer.

    Args:
        x: (..., K) input, any leading dims, may be non-contiguous.
        weight: (N, K) frozen (or trainable) base weight; bias: (N,) or None.
        lora_A: (r, K); lora_B: (N, r); magnitude: (N,) (PEFT's ``lora_magnitude_vector``).
        scaling: LoRA scale ``s``; a finite float.
        dropout_p: dropout on the LoRA branch input in [0, 1), applied only when ``training``;
            as in PEFT the dropped input then also goes through W for the (g-1) term.
        backend: "triton", "cpu" or "reference"; default: FASTPEFT_BACKEND, else automatic.
    Returns:
        (..., N) output in x's dtype.
    """
    amp = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if amp is not None:
        x, weight, bias, lora_A, lora_B, magnitude = cast_all(amp, x, weight, bias, lora_A, lora_B, magnitude)
    _check(x, weight, bias, lora_A, lora_B, magnitude)
    scaling = check_scaling(scaling)
    p = check_dropout(dropout_p)
    p = p if training else 0.0
    seed = _dropout.new_seed(p > 0.0)
    be = select_backend("dora", x.device, backend, x.dtype)
    w_sq = cached_weight_sq(weight)
    return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, p, seed, be)
