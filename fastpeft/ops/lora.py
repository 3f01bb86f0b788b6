"""Fused LoRA linear: ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``.

Chain: ``LoRALinear`` (module) -> ``LoRALinearFunction`` (autograd) ->
``torch.ops.fastpeft.lora_fwd`` / ``lora_bwd`` (torch.library) -> backend kernel
``lora_fwd_{triton,cpu,reference}``.

Kernel contract, shared by every backend (2-D inputs; the Function flattens leading dims):

* ``lora_fwd(x (M,K), weight (N,K), bias (N,)|None, lora_A (r,K), lora_B (N,r), scaling,
  dropout_p, seed) -> (y (M,N), t (M,r))`` with ``t = drop(x)·Aᵀ`` kept for backward.
* ``lora_bwd(dy (M,N), x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x,
  need_weight, need_bias) -> (dx (M,K), dW (N,K), db (N,), dA (r,K), dB (N,r))``; the
  gradients not needed are returned as empty tensors.

Dropout masks come from ``fastpeft._dropout`` (counter-based, identical on every backend)
and are regenerated in backward, never stored.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastpeft import _dropout
from fastpeft._backend import get_kernel, select_backend
from fastpeft._validate import check_dropout, check_linear, check_scaling, check_tensor
from fastpeft.ops._common import autocast_dtype, cast_all, none_if_empty, run_op


@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    return get_kernel("lora", "lora_fwd", backend)(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
             scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool, need_weight: bool,
             need_bias: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("lora", "lora_bwd", backend)(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p,
                                                   seed, need_x, need_weight, need_bias)


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_x, need_weight, need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[0] if need_bias else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the fused LoRA linear; x is saved by reference, the mask is regenerated."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), K)  # not (-1, K): that is ambiguous when K = 0
        y, t = run_op(lora_fwd, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, t)
        ctx.seed, ctx.scaling, ctx.dropout_p, ctx.backend = seed, scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, t = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        dy2 = dy.reshape(x2.shape[0], weight.shape[0])
        dx, dW, db, dA, dB = run_op(lora_bwd, dy2, x2, weight, lora_A, lora_B, t, ctx.scaling, ctx.dropout_p,
                                      ctx.seed, need_x, need_w, need_b, ctx.backend)
        dx = dx.view(*dy.shape[:-1], x2.shape[1]) if need_x else None
        return (dx, none_if_empty(dW, need_w), none_if_empty(db, need_b), dA, dB,
                None, None, None, None)


def _check(x, weight, bias, lora_A, lora_B):
    K, N = check_linear(x, weight, bias)
    check_tensor("lora_A", lora_A, ndim=2, dtype=x.dtype, device=x.device)
    r = lora_A.shape[0]
    if lora_A.shape[1] != K or r < 1:
        raise ValueError(f"lora_A: expected shape (r, {K}) with r >= 1, got {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, shape=(N, r), dtype=x.dtype, device=x.device)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0, training: bool = False,
                backend: Optional[str] = None) -> Tensor:
    """Fused ``x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``.

    Args:
        x: (..., K) input, any leading dims, may be non-contiguous.
        weight: (N, K) frozen (or trainable) base weight; bias: (N,) or None.
        lora_A: (r, K); lora_B: (N, r) - the nn.Linear / HF PEFT layout.
        scaling: LoRA scale ``s`` (alpha/r, or alpha/sqrt(r) for rsLoRA); a finite float.
        dropout_p: dropout on the LoRA branch input in [0, 1) (checked always), applied only when
            ``training``.
        backend: "triton", "cpu" or "reference"; default: FASTPEFT_BACKEND, else automatic.
    Returns:
        (..., N) output in x's dtype (fp32 accumulation for fp16/bf16).
    """
    amp = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if amp is not None:
        x, weight, bias, lora_A, lora_B = cast_all(amp, x, weight, bias, lora_A, lora_B)
    _check(x, weight, bias, lora_A, lora_B)
    scaling = check_scaling(scaling)
    p = check_dropout(dropout_p)  # checked in eval mode too
    p = p if training else 0.0
    seed = _dropout.new_seed(p > 0.0)
    be = select_backend("lora", x.device, backend, x.dtype)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed, be)
