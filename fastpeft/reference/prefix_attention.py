"""Attention over ``[prefix ; main]`` keys/values in plain PyTorch.

``prefix_attention_reference`` is the autograd oracle every backend is compared with: it
*does* concatenate the (batch-expanded) prefix and the main K/V and calls
``F.scaled_dot_product_attention`` with the combined mask - exactly what a user writes.

``prefix_attention_fwd_reference`` / ``prefix_attention_bwd_reference`` are the reference
backend's explicit kernels with the contract every backend shares (see
``fastpeft/ops/prefix_attention.py``): they score the two key sources separately and merge
them through one log-sum-exp, so they never build the concatenated K/V either.

Shapes: q (B, H, L, D); k, v (B, Hkv, S, D); prefix_k, prefix_v (Bp, Hkv, P, D) with Bp in
{1, B}; H % Hkv == 0 and query head h reads kv head h // (H // Hkv).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32; fp64 stays fp64 so gradcheck and fp64 tests are tight.
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the returned log-sum-exp: float32, or float64 for float64 inputs."""
    return _compute_dtype(dtype)


def main_mask(attn_mask: Optional[Tensor], is_causal: bool, L: int, S: int, dtype: torch.dtype,
              device) -> Optional[Tensor]:
    """Additive mask over the main keys (broadcastable to (B, H, L, S)) or None.

    bool masks follow SDPA (True = attend); causal is top-left aligned (query i sees j <= i).
    """
    m = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, -math.inf)
        else:
            m = attn_mask.to(dtype)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        c = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~causal, -math.inf)
        m = c if m is None else m + c
    return m


def prefix_attention_reference(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                               attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                               scale: Optional[float] = None) -> Tensor:
    """``softmax(q·[pk;k]ᵀ·scale + [0;mask])·[pv;v]`` by ``cat`` + SDPA, differentiated by autograd.

    q (B,H,L,D); k, v (B,Hkv,S,D); prefix_k, prefix_v (Bp,Hkv,P,D); attn_mask bool or additive,
    broadcastable to (B,H,L,S), covering the main keys only -> out (B,H,L,D).
    """
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    kk = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
    vv = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
    if H != Hkv:
        kk = kk.repeat_interleave(H // Hkv, dim=1)
        vv = vv.repeat_interleave(H // Hkv, dim=1)
    m = main_mask(attn_mask, is_causal, L, S, q.dtype, q.device)
    full = None
    if m is not None:
        m = m.expand(B, H, L, S)
        full = torch.cat([torch.zeros(B, H, L, P, dtype=q.dtype, device=q.device), m], dim=-1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=full, scale=scale)


# --- explicit kernels (the reference backend) --------------------------------------------------
def _grouped(x: Tensor, Hkv: int) -> Tensor:
    """(B, H, L, D) -> (B, Hkv, G*L, D): the G query heads that share a kv head, stacked."""
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, (H // Hkv) * L, D)


def _scores(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, cdt):
    """Scaled scores of both key sources in compute dtype: (s_p (B,Hkv,G*L,P), s_m (B,Hkv,G*L,S))."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = _grouped(q.to(cdt), Hkv)
    s_p = torch.matmul(qg, prefix_k.to(cdt).transpose(-1, -2)) * scale
    s_m = torch.matmul(qg, k.to(cdt).transpose(-1, -2)) * scale
    G = H // Hkv
    if attn_mask is not None or is_causal:
        s_m = s_m.view(B, Hkv, G, L, S)
        if attn_mask is not None:
            s_m = s_m + attn_mask.to(cdt).reshape(B, Hkv, G, L, S)
        if is_causal:
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            s_m = s_m.masked_fill(~keep, -math.inf)
        s_m = s_m.reshape(B, Hkv, G * L, S)
    return s_p, s_m


def prefix_attention_fwd_reference(q, k, v, prefix_k, prefix_v, attn_mask: Optional[Tensor],
                                   is_causal: bool, scale: float):
    """-> (out (B,H,L,D) in q's dtype, lse (B,H,L) float32 (float64 for float64 inputs)).

    attn_mask: None or additive (B,H,L,S) of q's dtype (may be a stride-0 view).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    s_p, s_m = _scores(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, cdt)
    # One log-sum-exp over both sources; P >= 1 keeps it finite even when the main part is all masked.
    lse = torch.logaddexp(torch.logsumexp(s_p, -1), torch.logsumexp(s_m, -1))  # (B,Hkv,G*L)
    out = torch.matmul(torch.exp(s_p - lse[..., None]), prefix_v.to(cdt)) \
        + torch.matmul(torch.exp(s_m - lse[..., None]), v.to(cdt))
    return out.reshape(B, H, L, D).to(q.dtype), lse.reshape(B, H, L)


def prefix_attention_bwd_reference(dout, q, k, v, prefix_k, prefix_v, attn_mask: Optional[Tensor],
                                   out, lse, is_causal: bool, scale: float):
    """-> (dq (B,H,L,D), dk, dv (B,Hkv,S,D), dprefix_k, dprefix_v (Bp,Hkv,P,D)).

    Standard flash-attention backward per source from the merged out and lse:
    p = exp(s - lse), ds = p·(dout·vᵀ - rowsum(dout⊙out)); a shared prefix (Bp=1) sums over B.
    """
    B, H, L, D = q.shape
    Hkv, Bp = k.shape[1], prefix_k.shape[0]
    cdt = _compute_dtype(q.dtype)
    s_p, s_m = _scores(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, cdt)
    lse_g = lse.to(cdt).reshape(B, Hkv, (H // Hkv) * L, 1)  # not -1: ambiguous when B or L is 0
    p_p, p_m = torch.exp(s_p - lse_g), torch.exp(s_m - lse_g)
    do = _grouped(dout.to(cdt), Hkv)
    delta = (do * _grouped(out.to(cdt), Hkv)).sum(-1, keepdim=True)
    pk, pv = prefix_k.to(cdt), prefix_v.to(cdt)
    ds_p = p_p * (torch.matmul(do, pv.transpose(-1, -2)) - delta)
    ds_m = p_m * (torch.matmul(do, v.to(cdt).transpose(-1, -2)) - delta)
    qg = _grouped(q.to(cdt), Hkv)
    dq = (torch.matmul(ds_p, pk) + torch.matmul(ds_m, k.to(cdt))) * scale
    dk = torch.matmul(ds_m.transpose(-1, -2), qg) * scale
    dv = torch.matmul(p_m.transpose(-1, -2), do)
    dpk = torch.matmul(ds_p.transpose(-1, -2), qg) * scale
    dpv = torch.matmul(p_p.transpose(-1, -2), do)
    if Bp == 1 and B != 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    return (dq.reshape(B, H, L, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype))
