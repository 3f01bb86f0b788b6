"""Fused DoRA linear in Triton (kernel contract and PEFT's conventions in ``fastpeft/ops/dora.py``).

    norm = ‖W + s·B·A‖ per row (detached), g = m / norm
    no dropout  y = x·(g⊙W)ᵀ + b + s·t·(g⊙B)ᵀ,     t = x·Aᵀ
    dropout     y = x·Wᵀ + b + (g-1)⊙v + s·t·(g⊙B)ᵀ,  v = xd·Wᵀ,  t = xd·Aᵀ,  xd = drop(x)

Kernels:

1. ``_dora_norm_kernel`` (one program per block of W's rows): the norm without the N×K matrix
   W + s·B·A: W·Aᵀ (BLOCK_N, r) accumulated over K in registers, then ‖W_n‖² (cached by the
   caller) + 2s·B_n·(W·Aᵀ)_n + s²·B_n·(A·Aᵀ)·B_nᵀ (B·(A·Aᵀ), N×r, from the host's tiny GEMMs).
2. Without dropout DoRA is LoRA on rows rescaled by g (dx = dy·(g⊙W) + dt·A, dt = s·dy·(g⊙B),
   dB = g⊙(s·dyᵀ·t)): forward and backward run the fused LoRA kernels of ``fastpeft.triton.lora``
   on g⊙W, g⊙B (an N×K scaled copy of W per call: no M×N temporary, the frozen GEMM's output is
   never re-read). The magnitude gradient Σ_rows dy⊙(y - b) / m comes from the saved output
   (``_dora_colsum_kernel``, one read of dy and y).
3. With dropout (PEFT also sends drop(x) through W): ``_dora_fwd_drop_kernel`` computes x·Wᵀ and
   drop(x)·Wᵀ from the same x and W tiles (mask hashed in registers), then the epilogue
   ``+ b + (g-1)⊙v + s·t·(g⊙B)ᵀ``; v is stored for the magnitude gradient. Backward:
   ``_lora_bwd_dt_kernel`` (dt = s·dy·(g⊙B), s·dyᵀ·t), then ``_dora_bwd_dx_drop_kernel``:
   dx = dy·W + mask/(1-p)⊙((dy⊙(g-1))·W + dt·A) with both GEMM accumulators fed by the same dy
   and W tiles, and dA += dtᵀ·(mask⊙x) by atomics, like LoRA's dx kernel.

dA / dB / the column sums use fp32 atomics or loops like the LoRA kernels (run-to-run
nondeterminism at fp32 rounding level for the atomics). float64 is refused. Dropout masks are
``fastpeft._dropout``'s hash, bit-identical to the other backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.reference.dora import dm_zero_rows
from fastpeft.triton import _common
from fastpeft.triton._common import dot as _dot
from fastpeft.triton._common import dropout_keep as _keep
from fastpeft.triton.lora import (_block_r, _chunk_r, _lora_bwd_dt_kernel, _lora_down_kernel, _row_config,
                                  lora_bwd_triton, lora_fwd_triton)


@triton.jit
def _dora_norm_kernel(
    w_ptr,      # (N, K) base weight, strides (swn, swk)
    a_ptr,      # (r, K) lora_A, strides (sar, sak)
    b_ptr,      # (N, r) lora_B, strides (sbn, sbr)
    baa_ptr,    # (N, r) fp32 B·(A·Aᵀ), contiguous (r×r Gram matrix formed by the host)
    wsq_ptr,    # (N,) fp32 ‖W_n‖² (contiguous)
    norm_ptr,   # (N,) fp32 out: ‖W_n + s·B_n·A‖
    N, K, r,
    swn, swk, sar, sak, sbn, sbr,
    scaling,    # LoRA scale s
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_N: tl.constexpr,   # rows of W per program
    BLOCK_K: tl.constexpr,   # K-tile of the reduction
    BLOCK_R: tl.constexpr,   # padded rank (power of two >= max(16, r)); held in registers
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = rows < N
    cr = tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = cr < r
    ck0 = tl.arange(0, BLOCK_K)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)  # this row block of W·Aᵀ
    for k0 in range(0, K, BLOCK_K):
        ck = (k0 + ck0).to(tl.int64)
        kmask = ck < K
        wt = tl.load(w_ptr + rows[:, None] * swn + ck[None, :] * swk, mask=nmask[:, None] & kmask[None, :],
                     other=0.0)
        # Aᵀ tile (BLOCK_K, BLOCK_R); padded rank columns load 0
        at = tl.load(a_ptr + cr[None, :] * sar + ck[:, None] * sak, mask=kmask[:, None] & rmask[None, :], other=0.0)
        wa = _dot(wt, at, wa, IEEE)
    bmask = nmask[:, None] & rmask[None, :]
    bt = tl.load(b_ptr + rows[:, None] * sbn + cr[None, :] * sbr, mask=bmask, other=0.0).to(tl.float32)
    baa = tl.load(baa_ptr + rows[:, None] * r + cr[None, :], mask=bmask, other=0.0)
    wsq = tl.load(wsq_ptr + rows, mask=nmask, other=0.0)
    n2 = wsq + 2.0 * scaling * tl.sum(bt * wa, axis=1) + scaling * scaling * tl.sum(baa * bt, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(tl.maximum(n2, 0.0)), mask=nmask)


@triton.jit
def _dora_colsum_kernel(
    dy_ptr,     # (M, N) upstream gradient, strides (sdm, sdn)
    y_ptr,      # (M, N) the forward's y (or v), strides (sym, syn)
    b_ptr,      # (N,) bias subtracted from y (unused when HAS_BIAS is False), stride sb
    out_ptr,    # (N,) fp32 out: Σ_rows dy⊙(y - b)
    M, N,
    sdm, sdn, sym, syn, sb,
    HAS_BIAS: tl.constexpr,  # subtract the bias from y
    BLOCK_M: tl.constexpr,   # rows per loop step
    BLOCK_N: tl.constexpr,   # columns per program
):
    pid = tl.program_id(0)
    cn = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = cn < N
    bias = tl.load(b_ptr + cn * sb, mask=nmask, other=0.0).to(tl.float32) if HAS_BIAS else None
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rm0 = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + rm0).to(tl.int64)
        msk = (rows < M)[:, None] & nmask[None, :]
        d = tl.load(dy_ptr + rows[:, None] * sdm + cn[None, :] * sdn, mask=msk, other=0.0).to(tl.float32)
        v = tl.load(y_ptr + rows[:, None] * sym + cn[None, :] * syn, mask=msk, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v = tl.where(msk, v - bias[None, :], 0.0)
        acc += tl.sum(d * v, axis=0)
    tl.store(out_ptr + cn, acc, mask=nmask)


@triton.jit(do_not_specialize=["seed", "thr"])
def _dora_fwd_drop_kernel(
    x_ptr,      # (M, K) input, strides (sxm, sxk)
    w_ptr,      # (N, K) base weight, strides (swn, swk)
    bias_ptr,   # (N,) bias (unused when HAS_BIAS is False), stride sb
    gm1_ptr,    # (N,) fp32 g - 1, contiguous
    t_ptr,      # (M, r) t = drop(x)·Aᵀ, contiguous
    bg_ptr,     # (N, r) g⊙B, contiguous, x's dtype
    y_ptr,      # (M, N) out: y, contiguous
    v_ptr,      # (M, N) out: v = drop(x)·Wᵀ, contiguous
    M, N, K, r,
    sxm, sxk, swn, swk, sb,
    scaling,    # LoRA scale s
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    inv_keep,   # 1 / (1 - p), applied to the fp32 v accumulator
    HAS_BIAS: tl.constexpr,  # add the bias
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows of y per program
    BLOCK_N: tl.constexpr,   # columns of y per program
    BLOCK_K: tl.constexpr,   # K-tile of the reduction
    BLOCK_R: tl.constexpr,   # rank chunk of the epilogue (>= 16, power of two)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    nmask = cn < N
    ck0 = tl.arange(0, BLOCK_K)
    acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ck = (k0 + ck0).to(tl.int64)
        kmask = ck < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxk, mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + cn[None, :] * swn + ck[:, None] * swk, mask=kmask[:, None] & nmask[None, :],
                     other=0.0)  # Wᵀ tile (BLOCK_K, BLOCK_N), read once for both products
        keep = _keep(seed, rows[:, None] * K + ck[None, :], thr)
        acc_z = _dot(xt, wt, acc_z, IEEE)
        acc_v = _dot(xt * keep.to(xt.dtype), wt, acc_v, IEEE)
    v = acc_v * inv_keep
    omask = rmask[:, None] & nmask[None, :]
    tl.store(v_ptr + rows[:, None] * N + cn[None, :], v.to(v_ptr.dtype.element_ty), mask=omask)
    # PEFT rounds v to the activation dtype before the (g-1) product: use the stored value
    v = v.to(v_ptr.dtype.element_ty).to(tl.float32)
    gm1 = tl.load(gm1_ptr + cn, mask=nmask, other=0.0)
    acc = acc_z + gm1[None, :] * v
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cn * sb, mask=nmask, other=0.0).to(tl.float32)[None, :]
    cr0 = tl.arange(0, BLOCK_R).to(tl.int64)
    lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        cr = r0 + cr0
        crmask = cr < r
        tt = tl.load(t_ptr + rows[:, None] * r + cr[None, :], mask=rmask[:, None] & crmask[None, :], other=0.0)
        bt = tl.load(bg_ptr + cn[None, :] * r + cr[:, None], mask=crmask[:, None] & nmask[None, :], other=0.0)
        lo = _dot(tt, bt, lo, IEEE)
    acc += scaling * lo
    tl.store(y_ptr + rows[:, None] * N + cn[None, :], acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["seed", "thr"])
def _dora_bwd_dx_drop_kernel(
    dy_ptr,     # (M, N) upstream gradient, strides (sdm, sdn)
    w_ptr,      # (N, K) base weight, strides (swn, swk)
    gm1_ptr,    # (N,) fp32 g - 1, contiguous
    x_ptr,      # (M, K) input, strides (sxm, sxk)
    a_ptr,      # (r, K) lora_A, strides (sar, sak)
    dt_ptr,     # (M, r) dt = s·dy·(g⊙B), contiguous
    dx_ptr,     # (M, K) out: dx, contiguous (unused when NEED_X is False)
    da_ptr,     # (r, K) fp32 out, zero-initialised: dtᵀ·(mask⊙x) accumulated with atomics
    M, N, K, r,
    sdm, sdn, swn, swk, sxm, sxk, sar, sak,
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    inv_keep,   # 1 / (1 - p)
    NEED_X: tl.constexpr,    # compute dx (else only dA)
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows of dx per program
    BLOCK_K: tl.constexpr,   # columns of dx (and of dA) per program
    BLOCK_N: tl.constexpr,   # N-tile of the dx GEMMs' reduction
    BLOCK_R: tl.constexpr,   # rank chunk (>= 16, power of two)
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ck = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    rmask = rows < M
    kmask = ck < K
    tmask = rmask[:, None] & kmask[None, :]
    keep = _keep(seed, rows[:, None] * K + ck[None, :], thr)  # hashed once for dx and dA
    xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxk, mask=tmask, other=0.0)
    xt = xt * keep.to(xt.dtype)
    cr0 = tl.arange(0, BLOCK_R).to(tl.int64)
    lo = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        cr = r0 + cr0
        crmask = cr < r
        dtt = tl.load(dt_ptr + rows[:, None] * r + cr[None, :], mask=rmask[:, None] & crmask[None, :], other=0.0)
        amask = crmask[:, None] & kmask[None, :]
        part = _dot(tl.trans(dtt), xt, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), IEEE)
        tl.atomic_add(da_ptr + cr[:, None] * K + ck[None, :], part, mask=amask, sem="relaxed")
        if NEED_X:
            at = tl.load(a_ptr + cr[:, None] * sar + ck[None, :] * sak, mask=amask, other=0.0)
            lo = _dot(dtt, at, lo, IEEE)
    if NEED_X:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # dy·W
        cn0 = tl.arange(0, BLOCK_N)
        for n0 in range(0, N, BLOCK_N):
            cn = (n0 + cn0).to(tl.int64)
            nmask = cn < N
            dyt = tl.load(dy_ptr + rows[:, None] * sdm + cn[None, :] * sdn, mask=rmask[:, None] & nmask[None, :],
                          other=0.0)
            wt = tl.load(w_ptr + cn[:, None] * swn + ck[None, :] * swk, mask=nmask[:, None] & kmask[None, :],
                         other=0.0)
            gm1 = tl.load(gm1_ptr + cn, mask=nmask, other=0.0)
            acc = _dot(dyt, wt, acc, IEEE)
            lo = _dot((dyt.to(tl.float32) * gm1[None, :]).to(dyt.dtype), wt, lo, IEEE)  # (dy⊙(g-1))·W
        acc += lo * (keep.to(tl.float32) * inv_keep)
        tl.store(dx_ptr + rows[:, None] * K + ck[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tmask)


def _tiles(x: torch.Tensor):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the two-accumulator GEMM kernels: small fixed tiles
    under the interpreter (the tests cover loops and edge masks), register-friendly ones on CUDA."""
    if _common.small_tiles(x):
        return 16, 32, 32, 4
    return 64, 64, 32, 4


def _norm(weight, w_sq, lora_A, lora_B, scaling: float) -> torch.Tensor:
    N, K = weight.shape
    r = lora_A.shape[0]
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    block_r = _block_r(r)
    bn, bk, warps = _row_config(weight, block_r)
    A32, B32 = lora_A.float(), lora_B.float()
    baa = (B32 @ (A32 @ A32.t())).contiguous()  # (N, r): tiny products, on the host's BLAS
    _dora_norm_kernel[(triton.cdiv(N, bn),)](
        weight, lora_A, lora_B, baa, w_sq.float().contiguous(), norm, N, K, r,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), IEEE=_common.ieee(weight.dtype), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, num_warps=warps)
    return norm


def _colsum(dy, y, bias) -> torch.Tensor:
    M, N = dy.shape
    out = torch.empty(N, dtype=torch.float32, device=dy.device)
    bm, bn = (16, 32) if _common.small_tiles(dy) else (64, 128)
    _dora_colsum_kernel[(triton.cdiv(N, bn),)](
        dy, y, dy if bias is None else bias, out, M, N, dy.stride(0), dy.stride(1), y.stride(0), y.stride(1),
        0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out


def dora_fwd_triton(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling: float, dropout_p: float, seed):
    """x (M, K) -> (y (M, N), t (M, r), norm (N,) fp32, v (M, N) with dropout else (0,))."""
    _common.check_dtype(x, "dora")
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    norm = _norm(weight, w_sq, lora_A, lora_B, scaling)
    g = magnitude.float() / norm
    Bg = (lora_B * g[:, None]).to(x.dtype)
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    if not dropout:
        y, t = lora_fwd_triton(x, (weight * g[:, None]).to(x.dtype), bias, lora_A, Bg, scaling, 0.0, None)
        return y, t, norm, x.new_empty(0)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    v = torch.empty((M, N), dtype=x.dtype, device=x.device)
    t = torch.empty((M, r), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, t, norm, v
    block_r = _block_r(r)
    ieee = _common.ieee(x.dtype)
    bm, bk, warps = _row_config(x, block_r)
    _lora_down_kernel[(triton.cdiv(M, bm),)](
        x, lora_A, t, M, K, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), seed_i, thr, inv_keep,
        DROPOUT=True, IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, num_warps=warps)
    BM, BN, BK, warps = _tiles(x)
    _dora_fwd_drop_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, weight, weight if bias is None else bias, (g - 1).contiguous(), t, Bg.contiguous(), y, v, M, N, K, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        float(scaling), seed_i, thr, inv_keep,
        HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=_chunk_r(block_r),
        num_warps=warps)
    return y, t, norm, v


def dora_bwd_triton(dy, x, weight, bias, lora_A, lora_B, magnitude, t, norm, yv, scaling: float, dropout_p: float,
                    seed, need_x: bool, need_weight: bool, need_bias: bool, need_mag: bool):
    """dy (M, N) -> (dx, dW, db, dA, dB, dm); unneeded ones empty (see fastpeft/ops/dora.py)."""
    _common.check_dtype(x, "dora")
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dt_ = x.dtype
    empty = lambda: x.new_empty(0)  # noqa: E731 - a fresh one each: custom-op outputs must not alias
    g = magnitude.float() / norm.float()
    Bg = (lora_B * g[:, None]).to(dt_)
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    db = dy.sum(0) if need_bias else empty()
    dm = empty()
    if not dropout:
        dx, dW, _, dA, dB = lora_bwd_triton(dy, x, (weight * g[:, None]).to(dt_), lora_A, Bg, t, scaling, 0.0, None,
                                            need_x, need_weight, False)
        dB = (dB.float() * g[:, None]).to(dt_)
        if need_weight:
            dW = (dW.float() * g[:, None]).to(dt_)
        if need_mag:
            dm = _colsum(dy, yv, bias) / magnitude.float()
            dm = dm_zero_rows(dm, dy.float(), x.float(), weight.float(), lora_B.float(), t.float(), magnitude,
                              norm, scaling).to(dt_)
        return dx, dW, db, dA, dB, dm
    block_r = _block_r(r)
    ieee = _common.ieee(dt_)
    dx = torch.empty((M, K), dtype=dt_, device=x.device) if need_x else empty()
    dt = torch.empty((M, r), dtype=dt_, device=x.device)
    dtB32 = torch.zeros((N, r), dtype=torch.float32, device=x.device)
    dA32 = torch.zeros((r, K), dtype=torch.float32, device=x.device)
    if M > 0:
        bm, bn, warps = _row_config(x, block_r)
        _lora_bwd_dt_kernel[(triton.cdiv(M, bm),)](
            dy, Bg, t, dt, dtB32, M, N, r, dy.stride(0), dy.stride(1), Bg.stride(0), Bg.stride(1), t.stride(0),
            t.stride(1), float(scaling), IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, num_warps=warps)
        BM, BN, BK, warps = _tiles(x)
        _dora_bwd_dx_drop_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](
            dy, weight, (g - 1).contiguous(), x, lora_A, dt, dx if need_x else dt, dA32, M, N, K, r,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
            lora_A.stride(0), lora_A.stride(1), seed_i, thr, inv_keep,
            NEED_X=need_x, IEEE=ieee, BLOCK_M=BM, BLOCK_K=BK, BLOCK_N=BN, BLOCK_R=_chunk_r(block_r), num_warps=warps)
    elif need_x:
        dx.zero_()
    dtB = dtB32 * float(scaling)                          # s·dyᵀ·t (the kernel leaves dB unscaled)
    dA = (dA32 * inv_keep).to(dt_)
    dB = (dtB * g[:, None]).to(dt_)
    if need_mag:  # Σ dy⊙(v + s·t·Bᵀ) / norm = (colsum(dy⊙v) + B_n·(s·dyᵀt)_n) / norm
        dm = ((_colsum(dy, yv, None) + (lora_B.float() * dtB).sum(1)) / norm.float()).to(dt_)
    dW = empty()
    if need_weight:  # full fine-tuning of W only: materialises drop(x)
        keep = _common.dropout_keep_triton(seed, dropout_p, M, K, x.device).to(dt_) * inv_keep
        dW = torch.mm(dy.t(), x) + torch.mm((dy * (g - 1).to(dt_)).t(), x * keep)
    return dx, dW, db, dA, dB, dm
