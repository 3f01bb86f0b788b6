"""Attention over ``[prefix ; main]`` keys/values in Triton, never concatenating them.

Kernels (the prefix-attention contract in ``fastpeft/ops/prefix_attention.py``):

Forward, ``prefix_attention_fwd_triton`` -> ``_pa_fwd_kernel``: flash-attention style, one
program per (block of queries, batch·head). The q tile is loaded once; ONE online softmax
(running max ``m``, running sum ``l``, fp32 output accumulator) first streams the prefix
keys/values (always visible, no mask), then the main keys/values (causal top-left and the
additive mask applied to scores in registers). The two sources are just two pointer sets:
a shared prefix (Bp = 1) is read with batch stride 0, so it is never expanded, and the
concatenated K/V never exists. GQA: query head h reads kv head h // (H // Hkv). It writes
``out`` and the natural-log ``lse`` (fp32) - the only things backward needs besides inputs.
Scores work in base 2 (``exp2``, the scale folded with log2(e)).

Backward, ``prefix_attention_bwd_triton`` (flash-attention-2 style, recomputing P from lse):

1. ``_pa_bwd_preprocess_kernel``: ``delta = rowsum(dout ⊙ out)`` (B, H, L) fp32.
2. ``_pa_bwd_dq_kernel``, one program per (query block, batch·head): streams both key
   sources, ``p = exp(s - lse)``, ``ds = p ⊙ (dout·vᵀ - delta)``, ``dq += ds·k``.
3. ``_pa_bwd_dkdv_kernel``, one program per (key block, batch·kv head), ONE launch over
   the key blocks of both sources (the prefix blocks first: they are the longest programs,
   every query sees them; a constexpr switches the masks off for the prefix code path): loops
   over the G query heads sharing the kv head and over the query blocks (causal: only blocks
   at or below the diagonal), accumulating ``dv += pᵀ·dout`` and ``dk += dsᵀ·q`` in fp32
   registers; each key row is written once, no atomics.

dprefix for a shared prefix (Bp = 1): each batch element's program writes its own fp32
partial (B, Hkv, P, D) and torch sums them over the batch afterwards. Deterministic, and the
partial buffer is only B·Hkv·P·D (prefixes are short), so atomics would save nothing worth
their nondeterminism. For Bp = B the kernel writes dprefix directly.

All loads are masked (no divisibility assumption on L, S, P or D; D is padded to a power of
two >= 16 for ``tl.dot``); every address product is int64, and each launch puts its
(blocks × batch·heads) programs on grid axis 0 (CUDA caps axes 1 and 2 at 65535), the block
index fastest, so consecutive programs share one head's keys/values as before
(``fastpeft/triton/_common.py``). fp16/bf16 operands go to tensor cores with fp32 accumulation;
fp32 uses ``input_precision="ieee"``; float64 is refused. On CUDA the kernels are autotuned
over H100-friendly tiles; under ``TRITON_INTERPRET=1`` small fixed tiles make the tests cover
the loops and the masks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastpeft.triton import _common
from fastpeft.triton._common import autotune as _autotune
from fastpeft.triton._common import dot as _dot

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _cfgs(pairs, stages=(3, 4), warps=(4, 8)):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w)
            for (m, n) in pairs for s in stages for w in warps]


#: the config of FASTPEFT_TRITON_AUTOTUNE=0 (test runs): small tiles, two stages (fp32, D = 256 fit)
_FIXED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=2, num_warps=4)


@triton.jit
def _split_pid(n_blocks):
    """(block index, batch·head index) of this program: grid axis 0 holds n_blocks · (B·H)
    programs, block index fastest. int64."""
    pid = tl.program_id(0).to(tl.int64)
    return pid % n_blocks, pid // n_blocks


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _pa_fwd_inner(acc, m_i, l_i, q, kv_k, kv_v, skn, skd, svn, svd, mask_base, sml, sms,
                  rows, rmask, cd, dmask, n_keys, lo, hi, qk_scale,
                  MASKED: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax pass over keys lo..hi of one key source (n_keys long) into (acc, m_i, l_i).

    Scores are in base-2 units: qk_scale = scale·log2(e); the additive mask is scaled by log2(e).
    MASKED: apply the main part's additive mask (False for the prefix); IS_CAUSAL: apply the
    causal mask (only for the key blocks that straddle the diagonal).
    """
    cn0 = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cn = n0 + cn0
        nmask = cn < n_keys
        kt = tl.load(kv_k + cn[None, :].to(tl.int64) * skn + cd[:, None] * skd,
                     mask=dmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N) = kᵀ
        s = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * qk_scale
        valid = nmask[None, :]
        if MASKED:
            if HAS_MASK:
                am = tl.load(mask_base + rows[:, None].to(tl.int64) * sml + cn[None, :].to(tl.int64) * sms,
                             mask=rmask[:, None] & valid, other=0.0)
                s += am.to(tl.float32) * 1.4426950408889634
        if IS_CAUSAL:
            valid = valid & (cn[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        # m_i is finite after the first prefix block (P >= 1, always visible), so no NaNs here
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(kv_v + cn[:, None].to(tl.int64) * svn + cd[None, :] * svd,
                     mask=nmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, m_i, l_i


@_autotune(_cfgs([(128, 64), (128, 128), (64, 64)]), key=["L", "S", "P", "D", "IS_CAUSAL", "HAS_MASK"],
           fixed=_FIXED)
@triton.jit
def _pa_fwd_kernel(
    q_ptr,      # (B, H, L, D) queries, strides (sqb, sqh, sql, sqd)
    k_ptr,      # (B, Hkv, S, D) main keys, strides (skb, skh, skn, skd)
    v_ptr,      # (B, Hkv, S, D) main values, strides (svb, svh, svn, svd)
    pk_ptr,     # (Bp, Hkv, P, D) prefix keys, strides (spkb, spkh, spkn, spkd); spkb = 0 when Bp = 1
    pv_ptr,     # (Bp, Hkv, P, D) prefix values, strides (spvb, spvh, spvn, spvd); spvb = 0 when Bp = 1
    mask_ptr,   # (B, H, L, S) additive mask (any strides, 0 for broadcast dims); unused without HAS_MASK
    o_ptr,      # (B, H, L, D) out, contiguous
    lse_ptr,    # (B, H, L) out: natural-log log-sum-exp, fp32, contiguous
    H, G, L, S, P, D,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smh, sml, sms,
    qk_scale,   # softmax scale · log2(e)
    HAS_MASK: tl.constexpr,   # attn_mask given
    IS_CAUSAL: tl.constexpr,  # causal over the main keys (top-left aligned)
    IEEE: tl.constexpr,       # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,    # queries per program
    BLOCK_N: tl.constexpr,    # keys per step of the online softmax
    BLOCK_D: tl.constexpr,    # head dim padded to a power of two >= 16
):
    pid_m, bh = _split_pid(tl.cdiv(L, BLOCK_M))
    b = bh // H
    h = bh % H
    hk = h // G  # grouped-query: the kv head this query head reads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    cd = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = cd < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sql + cd[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # 1. prefix keys: always visible
    acc, m_i, l_i = _pa_fwd_inner(acc, m_i, l_i, q, pk_ptr + b * spkb + hk * spkh, pv_ptr + b * spvb + hk * spvh,
                                  spkn, spkd, spvn, spvd, mask_ptr, sml, sms, rows, rmask, cd, dmask, P, 0, P,
                                  qk_scale, False, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)
    # 2. main keys, additive mask; causal: key blocks left of the diagonal need no causal mask,
    #    the ones straddling it do, the ones right of it are skipped
    k_b, v_b = k_ptr + b * skb + hk * skh, v_ptr + b * svb + hk * svh
    mask_b = mask_ptr + b * smb + h * smh
    if IS_CAUSAL:
        mid = tl.minimum((pid_m * BLOCK_M // BLOCK_N) * BLOCK_N, S)
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        acc, m_i, l_i = _pa_fwd_inner(acc, m_i, l_i, q, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                                      cd, dmask, S, 0, mid, qk_scale, True, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)
        acc, m_i, l_i = _pa_fwd_inner(acc, m_i, l_i, q, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                                      cd, dmask, S, mid, hi, qk_scale, True, HAS_MASK, True, IEEE, BLOCK_M, BLOCK_N)
    else:
        acc, m_i, l_i = _pa_fwd_inner(acc, m_i, l_i, q, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                                      cd, dmask, S, 0, S, qk_scale, True, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    obase = bh * L
    tl.store(o_ptr + (obase + rows[:, None]) * D + cd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + obase + rows, lse, mask=rmask)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _pa_bwd_preprocess_kernel(
    o_ptr,      # (B, H, L, D) out, strides (sob, soh, sol, sod)
    do_ptr,     # (B, H, L, D) dout, strides (sdb, sdh, sdl, sdd)
    delta_ptr,  # (B, H, L) out: rowsum(dout ⊙ out), fp32, contiguous
    H, L, D,
    sob, soh, sol, sod, sdb, sdh, sdl, sdd,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
):
    pid_m, bh = _split_pid(tl.cdiv(L, BLOCK_M))
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    cd = tl.arange(0, BLOCK_D).to(tl.int64)
    m2 = rmask[:, None] & (cd < D)[None, :]
    r64 = rows[:, None]
    o = tl.load(o_ptr + b * sob + h * soh + r64 * sol + cd[None, :] * sod, mask=m2, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * sdb + h * sdh + r64 * sdl + cd[None, :] * sdd, mask=m2, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * L + rows, tl.sum(o * do, 1), mask=rmask)


@triton.jit
def _pa_bwd_dq_inner(dq, q, do, lse2, delta, kv_k, kv_v, skn, skd, svn, svd, mask_base, sml, sms,
                     rows, rmask, cd, dmask, n_keys, lo, hi, qk_scale,
                     MASKED: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq += Σ ds·k over keys lo..hi of one key source (unscaled: the caller multiplies by the scale).

    MASKED / IS_CAUSAL as in ``_pa_fwd_inner``.
    """
    cn0 = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cn = n0 + cn0
        nmask = cn < n_keys
        kt = tl.load(kv_k + cn[None, :].to(tl.int64) * skn + cd[:, None] * skd,
                     mask=dmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(kv_v + cn[None, :].to(tl.int64) * svn + cd[:, None] * svd,
                     mask=dmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N) = vᵀ
        s = _dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * qk_scale
        valid = nmask[None, :]
        if MASKED:
            if HAS_MASK:
                am = tl.load(mask_base + rows[:, None].to(tl.int64) * sml + cn[None, :].to(tl.int64) * sms,
                             mask=rmask[:, None] & valid, other=0.0)
                s += am.to(tl.float32) * 1.4426950408889634
        if IS_CAUSAL:
            valid = valid & (cn[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(q.dtype), tl.trans(kt), dq, IEEE)
    return dq


@_autotune(_cfgs([(64, 64), (128, 64), (64, 32)]), key=["L", "S", "P", "D", "IS_CAUSAL", "HAS_MASK"],
           fixed=_FIXED)
@triton.jit
def _pa_bwd_dq_kernel(
    q_ptr,      # (B, H, L, D) queries, strides (sqb, sqh, sql, sqd)
    k_ptr,      # (B, Hkv, S, D) main keys, strides (skb, skh, skn, skd)
    v_ptr,      # (B, Hkv, S, D) main values, strides (svb, svh, svn, svd)
    pk_ptr,     # (Bp, Hkv, P, D) prefix keys; spkb = 0 when Bp = 1
    pv_ptr,     # (Bp, Hkv, P, D) prefix values; spvb = 0 when Bp = 1
    mask_ptr,   # (B, H, L, S) additive mask (any strides); unused without HAS_MASK
    do_ptr,     # (B, H, L, D) dout, strides (sdb, sdh, sdl, sdd)
    lse_ptr,    # (B, H, L) forward lse (natural log, fp32), contiguous
    delta_ptr,  # (B, H, L) rowsum(dout ⊙ out), fp32, contiguous
    dq_ptr,     # (B, H, L, D) out: dq, contiguous
    H, G, L, S, P, D,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smh, sml, sms, sdb, sdh, sdl, sdd,
    scale,      # softmax scale (natural units)
    HAS_MASK: tl.constexpr,   # attn_mask given
    IS_CAUSAL: tl.constexpr,  # causal over the main keys
    IEEE: tl.constexpr,       # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,    # queries per program
    BLOCK_N: tl.constexpr,    # keys per step
    BLOCK_D: tl.constexpr,    # head dim padded to a power of two >= 16
):
    pid_m, bh = _split_pid(tl.cdiv(L, BLOCK_M))
    b = bh // H
    h = bh % H
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    cd = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = cd < D
    m2 = rmask[:, None] & dmask[None, :]
    r64 = rows[:, None]
    q = tl.load(q_ptr + b * sqb + h * sqh + r64 * sql + cd[None, :] * sqd, mask=m2, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + r64 * sdl + cd[None, :] * sdd, mask=m2, other=0.0)
    lse2 = tl.load(lse_ptr + bh * L + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * L + rows, mask=rmask, other=0.0)
    qk_scale = scale * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _pa_bwd_dq_inner(dq, q, do, lse2, delta, pk_ptr + b * spkb + hk * spkh, pv_ptr + b * spvb + hk * spvh,
                          spkn, spkd, spvn, spvd, mask_ptr, sml, sms, rows, rmask, cd, dmask, P, 0, P, qk_scale,
                          False, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)
    k_b, v_b = k_ptr + b * skb + hk * skh, v_ptr + b * svb + hk * svh
    mask_b = mask_ptr + b * smb + h * smh
    if IS_CAUSAL:  # unmasked blocks left of the diagonal, causal-masked blocks on it, none right of it
        mid = tl.minimum((pid_m * BLOCK_M // BLOCK_N) * BLOCK_N, S)
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        dq = _pa_bwd_dq_inner(dq, q, do, lse2, delta, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                              cd, dmask, S, 0, mid, qk_scale, True, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)
        dq = _pa_bwd_dq_inner(dq, q, do, lse2, delta, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                              cd, dmask, S, mid, hi, qk_scale, True, HAS_MASK, True, IEEE, BLOCK_M, BLOCK_N)
    else:
        dq = _pa_bwd_dq_inner(dq, q, do, lse2, delta, k_b, v_b, skn, skd, svn, svd, mask_b, sml, sms, rows, rmask,
                              cd, dmask, S, 0, S, qk_scale, True, HAS_MASK, False, IEEE, BLOCK_M, BLOCK_N)
    tl.store(dq_ptr + (bh * L + r64) * D + cd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m2)


@triton.jit
def _pa_dkdv_block(q_ptr, k_base, v_base, skn, skd, svn, svd, mask_b, smh, sml, sms, do_ptr, lse_ptr, delta_ptr,
                   dk_base, dv_base, pid_n, b, hk, Hkv, G, L, NK, D,
                   sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd, scale,
                   PREFIX: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of key block ``pid_n`` of one source (NK keys at k_base / v_base) for batch b, kv head hk.

    Loops over the G query heads sharing the kv head and over their query blocks; writes the
    (BLOCK_N, D) rows of dk (scaled) and dv at dk_base / dv_base (contiguous (NK, D)).
    PREFIX: the keys are the prefix (always visible: no causal, no attn_mask).
    """
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 (pid_n is)
    nmask = cn < NK
    cd = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = cd < D
    n2 = nmask[:, None] & dmask[None, :]
    c64 = cn[:, None]
    k = tl.load(k_base + c64 * skn + cd[None, :] * skd, mask=n2, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_base + c64 * svn + cd[None, :] * svd, mask=n2, other=0.0)
    qk_scale = scale * 1.4426950408889634

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if not PREFIX:
        if IS_CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries above the diagonal see none of these keys
    cm0 = tl.arange(0, BLOCK_M)
    for g in range(0, G):
        h = hk * G + g
        bh = (b * Hkv + hk) * G + g
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdb + h * sdh
        for m0 in range(lo, L, BLOCK_M):
            rows = m0 + cm0
            rmask = rows < L
            r64 = rows[None, :].to(tl.int64)
            m2t = dmask[:, None] & rmask[None, :]
            qt = tl.load(q_base + r64 * sql + cd[:, None] * sqd, mask=m2t, other=0.0)     # (BLOCK_D, BLOCK_M) = qᵀ
            dot_ = tl.load(do_base + r64 * sdl + cd[:, None] * sdd, mask=m2t, other=0.0)  # doutᵀ
            lse2 = tl.load(lse_ptr + bh * L + rows, mask=rmask, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + bh * L + rows, mask=rmask, other=0.0)
            st = _dot(k, qt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE) * qk_scale  # sᵀ
            valid = nmask[:, None] & rmask[None, :]
            if not PREFIX:
                if HAS_MASK:
                    am = tl.load(mask_b + h * smh + r64 * sml + c64 * sms, mask=valid, other=0.0)
                    st += am.to(tl.float32) * 1.4426950408889634
                if IS_CAUSAL:
                    valid = valid & (cn[:, None] <= rows[None, :])
            pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)  # pᵀ (BLOCK_N, BLOCK_M)
            dv = _dot(pt.to(k.dtype), tl.trans(dot_), dv, IEEE)
            dpt = _dot(v, dot_, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk = _dot(dst.to(k.dtype), tl.trans(qt), dk, IEEE)
    obase = c64 * D + cd[None, :]
    tl.store(dk_base + obase, (dk * scale).to(dk_base.dtype.element_ty), mask=n2)
    tl.store(dv_base + obase, dv.to(dv_base.dtype.element_ty), mask=n2)


@_autotune(_cfgs([(32, 128), (64, 64), (32, 64)]), key=["L", "S", "P", "D", "IS_CAUSAL", "HAS_MASK"],
           fixed=_FIXED)
@triton.jit
def _pa_bwd_dkdv_kernel(
    q_ptr,      # (B, H, L, D) queries, strides (sqb, sqh, sql, sqd)
    k_ptr,      # (B, Hkv, S, D) main keys, strides (skb, skh, skn, skd)
    v_ptr,      # (B, Hkv, S, D) main values, strides (svb, svh, svn, svd)
    pk_ptr,     # (Bp, Hkv, P, D) prefix keys; spkb = 0 when Bp = 1
    pv_ptr,     # (Bp, Hkv, P, D) prefix values; spvb = 0 when Bp = 1
    mask_ptr,   # (B, H, L, S) additive mask (any strides); unused without HAS_MASK
    do_ptr,     # (B, H, L, D) dout, strides (sdb, sdh, sdl, sdd)
    lse_ptr,    # (B, H, L) forward lse (natural log, fp32), contiguous
    delta_ptr,  # (B, H, L) rowsum(dout ⊙ out), fp32, contiguous
    dk_ptr,     # (B, Hkv, S, D) out: dk, contiguous
    dv_ptr,     # (B, Hkv, S, D) out: dv, contiguous
    dpk_ptr,    # (B, Hkv, P, D) out: dprefix_k, or its per-batch fp32 partials for a shared prefix
    dpv_ptr,    # (B, Hkv, P, D) out: dprefix_v, likewise
    Hkv, G, L, S, P, D,
    sqb, sqh, sql, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd, smb, smh, sml, sms, sdb, sdh, sdl, sdd,
    scale,      # softmax scale (natural units)
    HAS_MASK: tl.constexpr,   # attn_mask given
    IS_CAUSAL: tl.constexpr,  # causal over the main keys
    IEEE: tl.constexpr,       # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,    # queries per step of the loop
    BLOCK_N: tl.constexpr,    # keys per program
    BLOCK_D: tl.constexpr,    # head dim padded to a power of two >= 16
):
    # one launch for both sources: the first cdiv(P, BLOCK_N) key blocks are the prefix (the
    # longest programs - every query sees them - so they are scheduled first), then the main keys
    n_pb = tl.cdiv(P, BLOCK_N)
    pid, bhk = _split_pid(n_pb + tl.cdiv(S, BLOCK_N))
    b = bhk // Hkv
    hk = bhk % Hkv
    if pid < n_pb:
        _pa_dkdv_block(q_ptr, pk_ptr + b * spkb + hk * spkh, pv_ptr + b * spvb + hk * spvh, spkn, spkd, spvn, spvd,
                       mask_ptr, smh, sml, sms, do_ptr, lse_ptr, delta_ptr,
                       dpk_ptr + bhk * P * D, dpv_ptr + bhk * P * D,
                       pid, b, hk, Hkv, G, L, P, D, sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd, scale,
                       True, HAS_MASK, IS_CAUSAL, IEEE, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _pa_dkdv_block(q_ptr, k_ptr + b * skb + hk * skh, v_ptr + b * svb + hk * svh, skn, skd, svn, svd,
                       mask_ptr + b * smb, smh, sml, sms, do_ptr, lse_ptr, delta_ptr,
                       dk_ptr + bhk * S * D, dv_ptr + bhk * S * D,
                       pid - n_pb, b, hk, Hkv, G, L, S, D, sqb, sqh, sql, sqd, sdb, sdh, sdl, sdd, scale,
                       False, HAS_MASK, IS_CAUSAL, IEEE, BLOCK_M, BLOCK_N, BLOCK_D)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
#: interpreter tiles: small, so the tests run the loops over several blocks and the edge masks
_INTERP = dict(BLOCK_M=16, BLOCK_N=16)


def _block_d(D: int) -> int:
    if D > 256:
        raise ValueError(f"q: the triton prefix-attention kernels support head dims up to 256, got D = {D}; "
                         f"use backend='cpu' or 'reference'")
    return max(16, triton.next_power_of_2(D))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # the contract: float32 (float64 for float64 inputs, which these kernels refuse)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_strides(attn_mask: Optional[torch.Tensor]):
    return (0, 0, 0, 0) if attn_mask is None else tuple(attn_mask.stride())


def _launch(kernel, grid_fn, args, meta):
    """Fixed small tiles (this module's ``_INTERP``, which tests may patch) under the interpreter;
    the autotuner's choice on CUDA."""
    _common.launch(kernel, grid_fn, args, meta, _INTERP)


def _prefix_strides(t: torch.Tensor):
    """Strides of a (Bp, Hkv, P, D) prefix; batch stride 0 when Bp = 1 so every batch reads the same one."""
    s = list(t.stride())
    if t.shape[0] == 1:
        s[0] = 0
    return s


def prefix_attention_fwd_triton(q, k, v, prefix_k, prefix_v, attn_mask: Optional[torch.Tensor],
                                is_causal: bool, scale: float):
    """q (B,H,L,D), k/v (B,Hkv,S,D), prefix_k/v (Bp,Hkv,P,D) -> (out (B,H,L,D), lse (B,H,L) fp32)."""
    _common.check_dtype(q, "prefix_attention")
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # no queries (B = 0 or L = 0)
        return out, lse.to(_lse_dtype(q.dtype))
    args = (q, k, v, prefix_k, prefix_v, q if attn_mask is None else attn_mask, out, lse,
            H, H // Hkv, L, S, P, D,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *_mask_strides(attn_mask), float(scale) * _LOG2E)
    meta = dict(HAS_MASK=attn_mask is not None, IS_CAUSAL=bool(is_causal), IEEE=_common.ieee(q.dtype),
                BLOCK_D=_block_d(D))
    _launch(_pa_fwd_kernel, lambda c: (triton.cdiv(L, c["BLOCK_M"]) * B * H,), args, meta)
    return out, lse.to(_lse_dtype(q.dtype))


def prefix_attention_bwd_triton(dout, q, k, v, prefix_k, prefix_v, attn_mask: Optional[torch.Tensor], out, lse,
                                is_causal: bool, scale: float):
    """-> (dq (B,H,L,D), dk, dv (B,Hkv,S,D), dprefix_k, dprefix_v (Bp,Hkv,P,D))."""
    _common.check_dtype(q, "prefix_attention")
    B, H, L, D = q.shape
    Hkv, S, P, Bp = k.shape[1], k.shape[2], prefix_k.shape[2], prefix_k.shape[0]
    G = H // Hkv
    dev, dt = q.device, q.dtype
    if B * L == 0:  # no queries: nothing reaches the keys, values or prefixes
        return (torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(prefix_k),
                torch.zeros_like(prefix_v))
    block_d = _block_d(D)
    ieee = _common.ieee(dt)
    lse = lse.to(torch.float32).contiguous()
    ms = _mask_strides(attn_mask)
    mask_arg = q if attn_mask is None else attn_mask

    # 1. delta = rowsum(dout ⊙ out)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=dev)
    bm = 16 if _common.small_tiles(q) else 64
    _pa_bwd_preprocess_kernel[(triton.cdiv(L, bm) * B * H,)](
        out, dout, delta, H, L, D, *out.stride(), *dout.stride(), BLOCK_M=bm, BLOCK_D=block_d)

    # 2. dq over both key sources
    dq = torch.empty((B, H, L, D), dtype=dt, device=dev)
    args = (q, k, v, prefix_k, prefix_v, mask_arg, dout, lse, delta, dq, H, G, L, S, P, D,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *ms, *dout.stride(), float(scale))
    meta = dict(HAS_MASK=attn_mask is not None, IS_CAUSAL=bool(is_causal), IEEE=ieee, BLOCK_D=block_d)
    _launch(_pa_bwd_dq_kernel, lambda c: (triton.cdiv(L, c["BLOCK_M"]) * B * H,), args, meta)

    # 3. dk/dv of both key sources in one launch; a shared prefix gets per-batch fp32 partials
    shared = Bp == 1 and B > 1
    dk = torch.empty((B, Hkv, S, D), dtype=dt, device=dev)
    dv = torch.empty((B, Hkv, S, D), dtype=dt, device=dev)
    pdt = torch.float32 if shared else dt
    dpk = torch.empty((B, Hkv, P, D), dtype=pdt, device=dev)
    dpv = torch.empty((B, Hkv, P, D), dtype=pdt, device=dev)
    args = (q, k, v, prefix_k, prefix_v, mask_arg, dout, lse, delta, dk, dv, dpk, dpv, Hkv, G, L, S, P, D,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *ms, *dout.stride(), float(scale))
    _launch(_pa_bwd_dkdv_kernel,
            lambda c: ((triton.cdiv(P, c["BLOCK_N"]) + triton.cdiv(S, c["BLOCK_N"])) * B * Hkv,), args, meta)
    if shared:
        dpk, dpv = dpk.sum(0, keepdim=True).to(dt), dpv.sum(0, keepdim=True).to(dt)
    return dq, dk, dv, dpk, dpv
