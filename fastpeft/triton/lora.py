"""Fused LoRA linear in Triton: ``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ``.

Kernels (the LoRA kernel contract in ``fastpeft/ops/lora.py``):

Forward, ``lora_fwd_triton``:

1. ``_lora_down_kernel`` (one program per block of rows): ``t = drop(x)·Aᵀ`` (M, r). The
   dropout mask is generated in registers from the counter hash while x streams through, so
   the dropped-out copy of x never exists; the ``1/(1-p)`` rescale is applied once to the
   fp32 accumulator instead of to every element of x.
2. ``_lora_fwd_kernel`` (one program per (BLOCK_M, BLOCK_N) tile of y, grouped ordering for
   L2 reuse): the base GEMM ``x·Wᵀ`` in an fp32 accumulator, then the rank-r update as extra
   K-steps into the *same* accumulator (``acc += (s·t)·Bᵀ``, r padded to >= 16 with masked
   zero loads), then ``+ b`` and one store. No M×N temporary, no separate add or scale pass.

Backward, ``lora_bwd_triton``:

1. ``_lora_bwd_dt_kernel`` (one program per block of rows) reads each dy tile ONCE and uses
   it twice: ``dt += dy·B`` (kept in registers over the N loop) and ``dB += dyᵀ·t`` (the t
   rows of this block are loaded once), reduced over row blocks with fp32 ``atomic_add``
   into an (N, r) fp32 buffer. ``s`` is applied once to dt and once to dB.
2. ``_lora_bwd_dx_kernel`` (one program per (BLOCK_M, BLOCK_K) tile of dx): the GEMM
   ``dx = dy·W`` plus ``(dt·A)⊙mask/(1-p)`` (computed first and used as the GEMM's initial
   accumulator, so one fp32 tile is live in the main loop), and - on the same tile, with
   the same regenerated mask - ``dA += dtᵀ·(mask⊙x)`` reduced over row blocks with fp32
   ``atomic_add`` into an (r, K) buffer (the 1/(1-p) goes on the (r, K) result). So x is
   read exactly once for dA and the mask is hashed once per element for both dx and dA.
   When dx is not needed the GEMM part is compiled out and the kernel is just the dA pass.
3. ``dW = dyᵀ·x`` and ``db = colsum(dy)`` (full fine-tuning only) use torch (cuBLAS).

Why atomics for dB / dA: the reductions run over M while the kernels are tiled over rows, and
per-row-block partials would cost (M/BLOCK_M)·N·r fp32 of extra DRAM traffic (~25 % of dy
for M=8192, N=4096, r=16) whereas the (N, r) / (r, K) fp32 targets stay in L2. The price is
run-to-run nondeterminism of dA / dB at fp32 rounding level (the summation order varies).

Dropout uses ``fastpeft._dropout``'s hash (uint32 murmur3 finaliser of the seed and the
element index ``i*K + j`` of the logical (M, K) matrix), so masks are bit-identical to the
reference and C++ backends and backward regenerates them instead of storing them.

All loads are masked (no divisibility assumption on M, N, K, r); every operand is read through
its strides (the bias too: a sliced or expanded stride-0 bias is fine) and every address product
is int64 (``fastpeft/triton/_common.py``). Dropout multiplies by the 0/1 mask like the reference,
so a dropped NaN/inf stays NaN. float64 is refused (``_common.unsupported_dtype``).
fp16/bf16 operands multiply on tensor cores with fp32 accumulation; fp32 uses
``input_precision="ieee"`` so results are tight. t and dt are kept in x's dtype (they are
tensor-core operands). On CUDA the two GEMM kernels are autotuned over H100-friendly tiles;
under ``TRITON_INTERPRET=1`` small fixed tiles make the tests cover the loops and the masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.triton import _common
from fastpeft.triton._common import autotune as _autotune
from fastpeft.triton._common import dot as _dot
from fastpeft.triton._common import dropout_keep as _keep

#: the largest rank: dt / t rows of a row block are held in registers padded to next_pow2(r)
MAX_RANK = 256


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-row") program order: GROUP_M row blocks share the same column blocks
    of the weight while they are hot in L2. int64 tile ids (their products with the tile sizes
    are addresses)."""
    pid = pid.to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N).to(tl.int64)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


def _gemm_configs(tile_a: str, tile_b: str):
    """Autotune space (CUDA only) for a GEMM producing (BLOCK_M, ``tile_b``) tiles reducing over ``tile_a``."""
    cfgs = []
    for bm, bn, bk, stages, warps in [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                                      (128, 128, 64, 3, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                      (64, 64, 64, 5, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, tile_b: bn, tile_a: bk, "GROUP_M": 8},
                                  num_stages=stages, num_warps=warps))
    return cfgs


#: the config of FASTPEFT_TRITON_AUTOTUNE=0 (test runs): small enough for fp32 operands' shared memory
_FIXED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4)


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "thr"])  # 0/1 values must stay runtime arguments
def _lora_down_kernel(
    x_ptr,      # (M, K) input, strides (sxm, sxk)
    a_ptr,      # (r, K) lora_A, strides (sar, sak)
    t_ptr,      # (M, r) out: t = drop(x)·Aᵀ, contiguous, x's dtype
    M, K, r,
    sxm, sxk, sar, sak,
    seed,       # dropout seed (int in [0, 2**31))
    thr,        # uint32 keep threshold (an element is kept iff hash >= thr)
    inv_keep,   # 1 / (1 - p), applied to the fp32 accumulator
    DROPOUT: tl.constexpr,   # dropout active (p > 0)
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_K: tl.constexpr,   # K-tile of the reduction
    BLOCK_R: tl.constexpr,   # padded rank (power of two >= max(16, r)); held in registers
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M*K may exceed 2**31
    rmask = rows < M
    cr = tl.arange(0, BLOCK_R).to(tl.int64)
    rkmask = cr < r
    ck0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ck = (k0 + ck0).to(tl.int64)
        kmask = ck < K
        xm = rmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxk, mask=xm, other=0.0)
        if DROPOUT:
            # mask element (i, j) of the logical (M, K) matrix: index i*K + j
            keep = _keep(seed, rows[:, None] * K + ck[None, :], thr)
            xt = xt * keep.to(xt.dtype)  # x·mask like the reference: a dropped NaN/inf gives NaN
        # Aᵀ tile (BLOCK_K, BLOCK_R); padded rank columns load 0 and add nothing
        at = tl.load(a_ptr + cr[None, :] * sar + ck[:, None] * sak, mask=kmask[:, None] & rkmask[None, :],
                     other=0.0)
        acc = _dot(xt, at, acc, IEEE)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(t_ptr + rows[:, None] * r + cr[None, :], acc.to(t_ptr.dtype.element_ty),
             mask=rmask[:, None] & rkmask[None, :])


@_autotune(_gemm_configs("BLOCK_K", "BLOCK_N"), key=["M", "N", "K", "r"], fixed=_FIXED)
@triton.jit
def _lora_fwd_kernel(
    x_ptr,      # (M, K) input, strides (sxm, sxk)
    w_ptr,      # (N, K) base weight, strides (swn, swk)
    b_ptr,      # (N,) bias, stride sb (0 for an expanded one); unused when HAS_BIAS is False
    t_ptr,      # (M, r) t from _lora_down_kernel, contiguous
    lb_ptr,     # (N, r) lora_B, strides (sbn, sbr)
    y_ptr,      # (M, N) out, contiguous
    M, N, K, r,
    sxm, sxk, swn, swk, sb, sbn, sbr,
    scaling,    # LoRA scale s
    HAS_BIAS: tl.constexpr,  # bias given
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows of y per program
    BLOCK_N: tl.constexpr,   # columns of y per program
    BLOCK_K: tl.constexpr,   # K-tile of the base GEMM
    BLOCK_R: tl.constexpr,   # rank chunk of the LoRA K-steps (>= 16, power of two)
    GROUP_M: tl.constexpr,   # row blocks per L2 group (program ordering)
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    nmask = cols < N
    ck0 = tl.arange(0, BLOCK_K)

    # base GEMM: acc = x·Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ck = (k0 + ck0).to(tl.int64)
        kmask = ck < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxk, mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * swn + ck[:, None] * swk, mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        acc = _dot(xt, wt, acc, IEEE)

    # rank-r update as extra K-steps of the same accumulator: acc += (s·t)·Bᵀ.
    # s is folded into the small t tile (BLOCK_M x BLOCK_R), not into the M×N result.
    cr0 = tl.arange(0, BLOCK_R).to(tl.int64)
    for r0 in range(0, r, BLOCK_R):
        cr = r0 + cr0
        crmask = cr < r
        tt = tl.load(t_ptr + rows[:, None] * r + cr[None, :], mask=rmask[:, None] & crmask[None, :], other=0.0)
        tt = (tt.to(tl.float32) * scaling).to(x_ptr.dtype.element_ty)
        bt = tl.load(lb_ptr + cols[None, :] * sbn + cr[:, None] * sbr, mask=crmask[:, None] & nmask[None, :],
                     other=0.0)
        acc = _dot(tt, bt, acc, IEEE)

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * sb, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _lora_bwd_dt_kernel(
    dy_ptr,     # (M, N) upstream gradient, strides (sdm, sdn)
    lb_ptr,     # (N, r) lora_B, strides (sbn, sbr)
    t_ptr,      # (M, r) t saved by forward, strides (stm, str_)
    dt_ptr,     # (M, r) out: dt = s·dy·B, contiguous, x's dtype
    db_ptr,     # (N, r) fp32 out, zero-initialised: dyᵀ·t accumulated with atomics (unscaled)
    M, N, r,
    sdm, sdn, sbn, sbr, stm, str_,
    scaling,    # LoRA scale s (applied to dt here; to dB by the host)
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_N: tl.constexpr,   # N-tile of the loop over dy's columns
    BLOCK_R: tl.constexpr,   # padded rank (power of two >= max(16, r)); held in registers
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    cr = tl.arange(0, BLOCK_R).to(tl.int64)
    crmask = cr < r
    trmask = rmask[:, None] & crmask[None, :]
    # this row block's t, loaded once for every N-tile's dB contribution
    tt = tl.load(t_ptr + rows[:, None] * stm + cr[None, :] * str_, mask=trmask, other=0.0)
    cn0 = tl.arange(0, BLOCK_N)
    dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cn = (n0 + cn0).to(tl.int64)
        nmask = cn < N
        # the one read of this dy tile feeds both reductions
        dyt = tl.load(dy_ptr + rows[:, None] * sdm + cn[None, :] * sdn, mask=rmask[:, None] & nmask[None, :],
                      other=0.0)
        bmask = nmask[:, None] & crmask[None, :]
        bt = tl.load(lb_ptr + cn[:, None] * sbn + cr[None, :] * sbr, mask=bmask, other=0.0)
        dt = _dot(dyt, bt, dt, IEEE)
        part = _dot(tl.trans(dyt), tt, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), IEEE)
        tl.atomic_add(db_ptr + cn[:, None] * r + cr[None, :], part, mask=bmask, sem="relaxed")
    tl.store(dt_ptr + rows[:, None] * r + cr[None, :], (dt * scaling).to(dt_ptr.dtype.element_ty), mask=trmask)


@_autotune(_gemm_configs("BLOCK_N", "BLOCK_K"), key=["M", "N", "K", "r", "NEED_X"], fixed=_FIXED,
           reset_to_zero=["da_ptr"])
@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_bwd_dx_kernel(
    dy_ptr,     # (M, N) upstream gradient, strides (sdm, sdn)
    w_ptr,      # (N, K) base weight, strides (swn, swk)
    x_ptr,      # (M, K) input, strides (sxm, sxk)
    a_ptr,      # (r, K) lora_A, strides (sar, sak)
    dt_ptr,     # (M, r) dt from _lora_bwd_dt_kernel, contiguous
    dx_ptr,     # (M, K) out: dx, contiguous (unused when NEED_X is False)
    da_ptr,     # (r, K) fp32 out, zero-initialised: dtᵀ·(mask⊙x) accumulated with atomics
    M, N, K, r,
    sdm, sdn, swn, swk, sxm, sxk, sar, sak,
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    inv_keep,   # 1 / (1 - p)
    NEED_X: tl.constexpr,    # compute dx (else only dA)
    DROPOUT: tl.constexpr,   # dropout active
    IEEE: tl.constexpr,      # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,   # rows of dx per program
    BLOCK_K: tl.constexpr,   # columns of dx (and of dA) per program
    BLOCK_N: tl.constexpr,   # N-tile of the dx GEMM's reduction
    BLOCK_R: tl.constexpr,   # rank chunk of the epilogue (>= 16, power of two)
    GROUP_M: tl.constexpr,   # row blocks per L2 group (program ordering)
):
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ck = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    rmask = rows < M
    kmask = ck < K
    tmask = rmask[:, None] & kmask[None, :]

    # the mask of this (BLOCK_M, BLOCK_K) tile, hashed once for both dx and dA
    if DROPOUT:
        keep = _keep(seed, rows[:, None] * K + ck[None, :], thr)
    xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxk, mask=tmask, other=0.0)
    if DROPOUT:
        xt = xt * keep.to(xt.dtype)  # mask⊙x like the reference (a dropped NaN/inf gives NaN)

    cr0 = tl.arange(0, BLOCK_R).to(tl.int64)
    lo = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        cr = r0 + cr0
        crmask = cr < r
        dtt = tl.load(dt_ptr + rows[:, None] * r + cr[None, :], mask=rmask[:, None] & crmask[None, :], other=0.0)
        amask = crmask[:, None] & kmask[None, :]
        # dA[r-chunk, k-tile] += dtᵀ·(mask⊙x) over this row block (1/(1-p) applied by the host)
        part = _dot(tl.trans(dtt), xt, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), IEEE)
        tl.atomic_add(da_ptr + cr[:, None] * K + ck[None, :], part, mask=amask, sem="relaxed")
        if NEED_X:
            at = tl.load(a_ptr + cr[:, None] * sar + ck[None, :] * sak, mask=amask, other=0.0)
            lo = _dot(dtt, at, lo, IEEE)

    if NEED_X:
        # dx = (dt·A)⊙mask/(1-p) + dy·W: the masked LoRA term is the GEMM's initial accumulator,
        # so only one (BLOCK_M, BLOCK_K) fp32 tile is live during the main loop
        if DROPOUT:
            acc = lo * (keep.to(tl.float32) * inv_keep)
        else:
            acc = lo
        cn0 = tl.arange(0, BLOCK_N)
        for n0 in range(0, N, BLOCK_N):
            cn = (n0 + cn0).to(tl.int64)
            nmask = cn < N
            dyt = tl.load(dy_ptr + rows[:, None] * sdm + cn[None, :] * sdn, mask=rmask[:, None] & nmask[None, :],
                          other=0.0)
            wt = tl.load(w_ptr + cn[:, None] * swn + ck[None, :] * swk, mask=nmask[:, None] & kmask[None, :],
                         other=0.0)
            acc = _dot(dyt, wt, acc, IEEE)
        tl.store(dx_ptr + rows[:, None] * K + ck[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tmask)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def _block_r(r: int) -> int:
    if r > MAX_RANK:
        raise ValueError(f"lora_A: the triton LoRA kernels support ranks 1..{MAX_RANK}, got r = {r}; "
                         f"use backend='cpu' or 'reference'")
    return max(16, triton.next_power_of_2(r))


def _row_config(x: torch.Tensor, block_r: int):
    """(BLOCK_M, BLOCK_K/N, num_warps) of the row-block kernels (t and dt/dB), register-bound by r."""
    if _common.small_tiles(x):
        return 16, 32, 4
    if block_r <= 32:
        return 128, 128, 8
    if block_r <= 64:
        return 64, 128, 8
    return 64, 64, 8


def _chunk_r(block_r: int) -> int:
    """Rank chunk of the GEMM kernels' LoRA K-steps: one 16..64-wide dot per chunk."""
    return min(block_r, 64)


_INTERP_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def lora_fwd_triton(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """x (M, K) -> (y (M, N), t (M, r)) with ``t = drop(x)·Aᵀ``; any strides."""
    _common.check_dtype(x, "lora")
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    block_r = _block_r(r)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    t = torch.empty((M, r), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, t
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    ieee = _common.ieee(x.dtype)

    bm, bk, warps = _row_config(x, block_r)
    _lora_down_kernel[(triton.cdiv(M, bm),)](
        x, lora_A, t, M, K, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        seed_i, thr, inv_keep,
        DROPOUT=dropout, IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, num_warps=warps,
    )

    args = (x, weight, weight if bias is None else bias, t, lora_B, y, M, N, K, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
            lora_B.stride(0), lora_B.stride(1), float(scaling))
    meta = dict(HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_R=_chunk_r(block_r))
    _common.launch(_lora_fwd_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),),
                   args, meta, _INTERP_GEMM)
    return y, t


def lora_bwd_triton(dy, x, weight, lora_A, lora_B, t, scaling: float, dropout_p: float, seed,
                    need_x: bool, need_weight: bool, need_bias: bool):
    """dy (M, N) -> (dx (M, K), dW (N, K), db (N,), dA (r, K), dB (N, r)); unneeded ones empty."""
    _common.check_dtype(x, "lora")
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    block_r = _block_r(r)
    dev, dt_ = x.device, x.dtype
    empty = lambda: x.new_empty(0)  # noqa: E731 - a fresh one each: custom-op outputs must not alias
    dx = torch.empty((M, K), dtype=dt_, device=dev) if need_x else empty()
    if M == 0:
        if need_x:
            dx = torch.zeros((M, K), dtype=dt_, device=dev)
        dW = torch.zeros((N, K), dtype=dt_, device=dev) if need_weight else empty()
        db = torch.zeros((N,), dtype=dt_, device=dev) if need_bias else empty()
        return dx, dW, db, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    ieee = _common.ieee(dt_)

    # 1. dt = s·dy·B (M, r) and dB = s·dyᵀ·t, one read of dy
    bm, bn, warps = _row_config(x, block_r)
    dt = torch.empty((M, r), dtype=dt_, device=dev)
    dB32 = torch.zeros((N, r), dtype=torch.float32, device=dev)
    _lora_bwd_dt_kernel[(triton.cdiv(M, bm),)](
        dy, lora_B, t, dt, dB32, M, N, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), t.stride(0), t.stride(1),
        float(scaling),
        IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, num_warps=warps,
    )

    # 2. dx = dy·W + (dt·A)⊙mask/(1-p) and dA = dtᵀ·(mask⊙x), one pass over x
    dA32 = torch.zeros((r, K), dtype=torch.float32, device=dev)
    args = (dy, weight, x, lora_A, dt, dx if need_x else dt, dA32, M, N, K, r,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
            lora_A.stride(0), lora_A.stride(1), seed_i, thr, inv_keep)
    meta = dict(NEED_X=need_x, DROPOUT=dropout, IEEE=ieee, BLOCK_R=_chunk_r(block_r))
    _common.launch(_lora_bwd_dx_kernel, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),),
                   args, meta, _INTERP_GEMM)

    dA = (dA32 * inv_keep).to(dt_) if dropout else dA32.to(dt_)
    dB = (dB32 * float(scaling)).to(dt_)
    dW = torch.mm(dy.t(), x) if need_weight else empty()
    db = dy.sum(0) if need_bias else empty()
    return dx, dW, db, dA, dB
