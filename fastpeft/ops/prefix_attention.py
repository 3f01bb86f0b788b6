"""Attention over ``[prefix ; main]`` keys/values without concatenating them.

Chain: prompt/prefix/VPT modules -> ``prefix_attention`` (validation, autocast, backend choice)
-> ``PrefixAttentionFunction`` (autograd) -> ``torch.ops.fastpeft.prefix_attention_fwd`` / ``_bwd``
(torch.library) -> backend kernel ``prefix_attention_{fwd,bwd}_{triton,cpu,reference}``.

Kernel contract, shared by every backend:

* ``prefix_attention_fwd(q (B,H,L,D), k (B,Hkv,S,D), v (B,Hkv,S,D), prefix_k (Bp,Hkv,P,D),
  prefix_v (Bp,Hkv,P,D), attn_mask (B,H,L,S) additive of q's dtype (may be a stride-0 view) | None,
  is_causal, scale) -> (out (B,H,L,D), lse (B,H,L))``; lse is float32 (float64 for float64 inputs),
  the natural-log log-sum-exp of the scaled scores over prefix and main keys together.
* ``prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, attn_mask|None, out, lse, is_causal, scale)
  -> (dq, dk, dv, dprefix_k (Bp,Hkv,P,D), dprefix_v)``.

Semantics: softmax attention over keys ``[prefix ; main]``. Bp is 1 (one prefix shared by the batch,
never expanded; its gradient sums over the batch) or B. Query head h reads kv head h // (H // Hkv).
Prefix keys are always visible; ``is_causal`` masks only the main part, top-left aligned (query i sees
main keys j <= i); ``attn_mask`` covers only the main keys. Only q, k, v, the prefixes, out, lse (and
the caller's mask view) are saved for backward: nothing of the concatenated K/V's size.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastpeft._backend import get_kernel, select_backend
from fastpeft._validate import check_tensor
from fastpeft.ops._common import autocast_dtype, cast_all, none_if_empty, run_op
from fastpeft.reference.prefix_attention import lse_dtype


@torch.library.custom_op("fastpeft::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         attn_mask: Optional[Tensor], is_causal: bool, scale: float,
                         backend: str) -> Tuple[Tensor, Tensor]:
    return get_kernel("prefix_attention", "prefix_attention_fwd", backend)(
        q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale)


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, backend):
    B, H, L, D = q.shape
    return q.new_empty(B, H, L, D), q.new_empty(B, H, L, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("fastpeft::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
                         prefix_v: Tensor, attn_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                         is_causal: bool, scale: float,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return get_kernel("prefix_attention", "prefix_attention_bwd", backend)(
        dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, is_causal, scale)


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, is_causal, scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


class PrefixAttentionFunction(torch.autograd.Function):
    """Autograd for prefix attention; backward recomputes scores from q, k, v, prefixes, out, lse.

    ``apply(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, backend)`` with the kernel
    contract's arguments (attn_mask already additive and (B,H,L,S)-shaped, or None).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, backend):
        out, lse = run_op(prefix_attention_fwd, q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, backend)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_mask, out, lse)
        ctx.is_causal, ctx.scale, ctx.backend = is_causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, attn_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = run_op(prefix_attention_bwd, dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse,
                                                    ctx.is_causal, ctx.scale, ctx.backend)
        nig = ctx.needs_input_grad
        return (none_if_empty(dq, nig[0]), none_if_empty(dk, nig[1]), none_if_empty(dv, nig[2]),
                none_if_empty(dpk, nig[3]), none_if_empty(dpv, nig[4]), None, None, None, None)


def _check(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale):
    check_tensor("q", q, ndim=4)
    B, H, L, D = q.shape
    if min(H, D) < 1:  # B = 0 or L = 0 (no queries) is fine: an empty output
        raise ValueError(f"q: expected shape (B, H, L, D) with H >= 1 and D >= 1, got {tuple(q.shape)}")
    check_tensor("k", k, ndim=4, dtype=q.dtype, device=q.device)
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv < 1:  # S = 0 is fine: the prefix alone is attended
        raise ValueError(f"k: expected shape ({B}, Hkv, S, {D}) with Hkv >= 1 to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if H % Hkv:
        raise ValueError(f"k: expected a number of kv heads dividing q's {H} heads, got Hkv={Hkv} "
                         f"(k shape {tuple(k.shape)})")
    check_tensor("v", v, shape=tuple(k.shape), dtype=q.dtype, device=q.device)
    check_tensor("prefix_k", prefix_k, ndim=4, dtype=q.dtype, device=q.device)
    Bp, P = prefix_k.shape[0], prefix_k.shape[2]
    if Bp not in (1, B) or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D or P < 1:
        raise ValueError(f"prefix_k: expected shape (1 or {B}, {Hkv}, P, {D}) with P >= 1, "
                         f"got {tuple(prefix_k.shape)}")
    check_tensor("prefix_v", prefix_v, shape=tuple(prefix_k.shape), dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ValueError(f"attn_mask: expected a bool or float tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            check_tensor("attn_mask", attn_mask, dtype=q.dtype, device=q.device)
        elif attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (to match q), got {attn_mask.device}")
        target = (B, H, L, S)
        shp = tuple(attn_mask.shape)
        if len(shp) > 4 or any(a not in (1, t) for a, t in zip(reversed(shp), reversed(target))):
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, L, S) = {target} "
                             f"(it covers the main keys only), got {shp}")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("attn_mask: gradients w.r.t. the mask are not supported; pass attn_mask.detach()")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale: expected a float, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def _additive_mask(attn_mask: Optional[Tensor], shape, dtype) -> Optional[Tensor]:
    """bool (True = attend) -> 0/-inf of ``dtype``; then broadcast to ``shape`` as a view (no copy)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, -math.inf)
    return attn_mask.expand(shape)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Softmax attention over ``[prefix ; main]`` keys/values, never concatenating them.

    Args:
        q: (B, H, L, D) queries, may be non-contiguous; B = 0 or L = 0 gives an empty output.
        k, v: (B, Hkv, S, D) main keys/values; H % Hkv == 0 (grouped-query: head h reads h // (H // Hkv));
            S = 0 attends to the prefix alone.
        prefix_k, prefix_v: (Bp, Hkv, P, D), Bp = 1 (shared by the batch, never expanded; its
            gradient sums over the batch) or Bp = B (one per sample); P >= 1.
        attn_mask: None, bool (True = attend, like SDPA) or additive float of q's dtype, broadcastable
            to (B, H, L, S); covers the main keys only (prefix keys are always visible). No gradient.
        is_causal: mask the main part top-left aligned: query i sees main keys j <= i.
        scale: score scale, default 1/sqrt(D).
        backend: "triton", "cpu" or "reference"; default: FASTPEFT_BACKEND, else automatic.
    Returns:
        (B, H, L, D) in q's dtype. Every query row sees at least the prefix, so no row is empty.
    """
    amp = autocast_dtype(q.device) if isinstance(q, Tensor) else None
    if amp is not None:
        q, k, v, prefix_k, prefix_v, attn_mask = cast_all(amp, q, k, v, prefix_k, prefix_v, attn_mask)
    scale = _check(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale)
    B, H, L, _ = q.shape
    mask = _additive_mask(attn_mask, (B, H, L, k.shape[2]), q.dtype)
    be = select_backend("prefix_attention", q.device, backend, q.dtype)
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, mask, is_causal, scale, be)
