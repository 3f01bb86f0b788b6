"""Many LoRA adapters in one batch, in Triton (the contract in ``fastpeft/ops/multi_lora.py``).

The frozen GEMM is the same for every row: it runs once for the whole batch on torch (cuBLAS:
``y = x·Wᵀ + b`` forward, ``dx = dy·W`` backward). Only the rank-r work depends on a row's
adapter, and it runs in segmented gather kernels (the S-LoRA / punica "SGMV" scheme, extended
to backward):

* the rows are grouped by adapter on the device, without a host sync: a stable
  ``argsort(ids)`` gives ``order`` (base rows with id -1 first, then adapter 0's rows, ...) and
  ``bincount`` + ``cumsum`` the segment offsets ``seg`` (n + 2 entries; adapter a owns
  ``order[seg[a+1] : seg[a+2]]``);
* ``_seg_matmul_kernel``: ``out[row] (+)= s[a]·mask_out(mask_in(in[row])·Wa)`` for every row of
  adapter a, one program per (adapter, block of that adapter's rows, output tile), all on grid
  axis 0. The rows are
  gathered through ``order`` (no sorted copy of x). It is the forward's shrink ``t = drop(x)·Aᵀ``
  and expand ``y += s·t·Bᵀ``, and the backward's ``dt = s·dy·B`` and ``dx += drop(dt·A)``:
  the per-adapter matrix is read through strides, so Aᵀ / B / A need no copies;
* ``_seg_outer_kernel``: ``G[a] = s[a]·Σ_{rows of a} U[row]ᵀ·mask(V[row])``, one program per
  (adapter, output tile), looping over the adapter's rows in a fixed order: ``dB = s·dyᵀ·t`` and
  ``dA = dtᵀ·drop(x)``. Deterministic (no atomics), and adapters without rows get zeros.

The grid covers ``cdiv(M, BLOCK_M)`` row blocks for every adapter (the segment sizes stay on
the device); programs past their adapter's rows return at once.
Dropout uses ``fastpeft._dropout``'s hash over the logical (M, K) view of x, so masks are
bit-identical to the reference and C++ backends. fp32 dots are exact (``ieee``); fp16/bf16 run
on tensor cores with fp32 accumulation; float64 is refused (``_common.unsupported_dtype``).
All addresses are int64 and every operand is read through its strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastpeft.triton import _common
from fastpeft.triton._common import dot as _dot
from fastpeft.triton._common import dropout_keep as _keep


@triton.jit(do_not_specialize=["seed", "thr"])  # 0/1 values must stay runtime arguments
def _seg_matmul_kernel(
    in_ptr,     # (M, IN) input rows, strides (sim, sii)
    w_ptr,      # per-adapter matrix W[a] (IN, OUT): element (a, i, o) at a*swa + i*swi + o*swo
    out_ptr,    # (M, OUT) output rows, strides (som, soo); rows of other adapters are not touched
    s_ptr,      # (n,) fp32 per-adapter scale; unused when HAS_SCALE is False
    order_ptr,  # (M,) int64 row indices grouped by adapter (base rows first)
    seg_ptr,    # (n + 2,) int64 offsets into order: adapter a owns [seg[a+1], seg[a+2])
    n_mb,       # row blocks per adapter in the grid (cdiv(M, BLOCK_M))
    n_ob,       # output tiles per row block (cdiv(OUT, BLOCK_O))
    IN, OUT,
    sim, sii, swa, swi, swo, som, soo,
    seed,       # dropout seed (int in [0, 2**31))
    thr,        # uint32 keep threshold (an element is kept iff hash >= thr)
    inv_keep,   # 1 / (1 - p)
    HAS_SCALE: tl.constexpr,   # multiply by s[a]
    DROP_IN: tl.constexpr,     # mask input element (row, i) (its logical index row*IN + i), then / (1-p)
    DROP_OUT: tl.constexpr,    # mask output element (row, o) (index row*OUT + o), then / (1-p)
    ACCUMULATE: tl.constexpr,  # out += result (else out = result)
    IEEE: tl.constexpr,        # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,     # rows per program (>= 16 for tl.dot)
    BLOCK_I: tl.constexpr,     # reduction tile (>= 16; a small IN such as the rank is padded by masks)
    BLOCK_O: tl.constexpr,     # output columns per program (>= 16)
):
    # (adapter, row block, output tile) flattened on axis 0 (axes 1 and 2 are capped at 65535)
    pid = tl.program_id(0).to(tl.int64)  # int64: its products with the tiles are addresses
    ob = pid % n_ob
    mb = (pid // n_ob) % n_mb
    a = pid // n_ob // n_mb
    start = tl.load(seg_ptr + a + 1)
    end = tl.load(seg_ptr + a + 2)
    if start + mb * BLOCK_M >= end:      # past this adapter's rows (or it has none)
        return
    pos = start + mb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = pos < end
    rows = tl.load(order_ptr + pos, mask=rmask, other=0).to(tl.int64)
    cols = ob * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    omask = cols < OUT
    w_base = w_ptr + a * swa
    ci0 = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        ci = (i0 + ci0).to(tl.int64)
        imask = ci < IN
        v = tl.load(in_ptr + rows[:, None] * sim + ci[None, :] * sii, mask=rmask[:, None] & imask[None, :], other=0.0)
        if DROP_IN:
            v = v * _keep(seed, rows[:, None] * IN + ci[None, :], thr).to(v.dtype)  # a dropped NaN stays NaN
        w = tl.load(w_base + ci[:, None] * swi + cols[None, :] * swo, mask=imask[:, None] & omask[None, :], other=0.0)
        acc = _dot(v, w.to(v.dtype), acc, IEEE)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + a)
    if DROP_IN:
        acc = acc * inv_keep
    if DROP_OUT:
        acc = acc * (_keep(seed, rows[:, None] * OUT + cols[None, :], thr).to(tl.float32) * inv_keep)
    optrs = out_ptr + rows[:, None] * som + cols[None, :] * soo
    m2 = rmask[:, None] & omask[None, :]
    if ACCUMULATE:
        acc += tl.load(optrs, mask=m2, other=0.0).to(tl.float32)
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["seed", "thr"])
def _seg_outer_kernel(
    u_ptr,      # (M, P) rows, strides (sum_, sup)
    v_ptr,      # (M, Q) rows, strides (svm, svq)
    g_ptr,      # (n, P, Q) out, contiguous: G[a] = s[a]·Σ_{rows of a} U[row]ᵀ·mask(V[row])
    s_ptr,      # (n,) fp32 per-adapter scale; unused when HAS_SCALE is False
    order_ptr,  # (M,) int64 row indices grouped by adapter
    seg_ptr,    # (n + 2,) int64 segment offsets (adapter a: [seg[a+1], seg[a+2]))
    n_pb,       # P tiles per adapter in the grid
    n_qb,       # Q tiles per P tile
    P, Q,
    sum_, sup, svm, svq,
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    inv_keep,   # 1 / (1 - p)
    HAS_SCALE: tl.constexpr,  # multiply by s[a]
    DROP_V: tl.constexpr,     # mask V element (row, q) (logical index row*Q + q), then / (1-p)
    IEEE: tl.constexpr,       # fp32 inputs: exact dot products
    BLOCK_M: tl.constexpr,    # rows per reduction step (>= 16)
    BLOCK_P: tl.constexpr,    # output rows per program (>= 16)
    BLOCK_Q: tl.constexpr,    # output columns per program (>= 16)
):
    # (adapter, P tile, Q tile) flattened on axis 0 (axes 1 and 2 are capped at 65535)
    pid = tl.program_id(0).to(tl.int64)
    a = pid // n_qb // n_pb
    cp = ((pid // n_qb) % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    cq = (pid % n_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    pmask = cp < P
    qmask = cq < Q
    start = tl.load(seg_ptr + a + 1)
    end = tl.load(seg_ptr + a + 2)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    m0 = tl.arange(0, BLOCK_M).to(tl.int64)
    for p0 in range(start, end, BLOCK_M):  # the adapter's rows in a fixed order: deterministic
        pos = p0 + m0
        rmask = pos < end
        rows = tl.load(order_ptr + pos, mask=rmask, other=0).to(tl.int64)
        u = tl.load(u_ptr + rows[:, None] * sum_ + cp[None, :] * sup, mask=rmask[:, None] & pmask[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * svm + cq[None, :] * svq, mask=rmask[:, None] & qmask[None, :], other=0.0)
        if DROP_V:
            v = v * _keep(seed, rows[:, None] * Q + cq[None, :], thr).to(v.dtype)
        acc = _dot(tl.trans(u), v.to(u.dtype), acc, IEEE)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + a)
    if DROP_V:
        acc = acc * inv_keep
    gptrs = g_ptr + a * P * Q + cp[:, None] * Q + cq[None, :]
    tl.store(gptrs, acc.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def _segments(ids: torch.Tensor, n: int):
    """(order, seg) on the device, no host sync: rows grouped by adapter (base rows first)."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n + 1)
    seg = torch.zeros(n + 2, dtype=torch.int64, device=ids.device)
    seg[1:] = torch.cumsum(counts, 0)
    return order, seg


def _tiles(t: torch.Tensor):
    """(BLOCK_M, wide tile, num_warps): small under the interpreter so tests cover the loops."""
    return (16, 16, 4) if _common.small_tiles(t) else (64, 64, 4)


def _seg_matmul(inp, w, w_strides, out, scales, order, seg, n, IN, OUT, drop, *, drop_in=False, drop_out=False,
                accumulate=False):
    """out[row] (+)= s[a]·mask_out(mask_in(inp[row])·W[a]) over every adapter's rows."""
    M = inp.shape[0]
    if M == 0 or OUT == 0:
        return
    dropout, seed_i, thr, inv_keep = drop
    bm, bo, warps = _tiles(inp)
    bi = 16 if IN <= 16 or _common.small_tiles(inp) else 64
    n_mb, n_ob = triton.cdiv(M, bm), triton.cdiv(OUT, bo)
    _seg_matmul_kernel[(n * n_mb * n_ob,)](
        inp, w, out, scales if scales is not None else seg, order, seg, n_mb, n_ob, IN, OUT,
        inp.stride(0), inp.stride(1), *w_strides, out.stride(0), out.stride(1),
        seed_i, thr, inv_keep,
        HAS_SCALE=scales is not None, DROP_IN=drop_in and dropout, DROP_OUT=drop_out and dropout,
        ACCUMULATE=accumulate, IEEE=_common.ieee(inp.dtype), BLOCK_M=bm, BLOCK_I=bi, BLOCK_O=bo, num_warps=warps,
    )


def _seg_outer(u, v, scales, order, seg, n, drop, *, drop_v=False):
    """G (n, P, Q) with G[a] = s[a]·Σ_{rows of a} u[row]ᵀ·mask(v[row])."""
    M, P, Q = u.shape[0], u.shape[1], v.shape[1]
    g = torch.zeros((n, P, Q), dtype=u.dtype, device=u.device)
    if M == 0 or P == 0 or Q == 0:
        return g
    dropout, seed_i, thr, inv_keep = drop
    bm, bt, warps = _tiles(u)
    bp = 16 if P <= 16 else bt
    bq = 16 if Q <= 16 else bt
    n_pb, n_qb = triton.cdiv(P, bp), triton.cdiv(Q, bq)
    _seg_outer_kernel[(n * n_pb * n_qb,)](
        u, v, g, scales if scales is not None else seg, order, seg, n_pb, n_qb, P, Q,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), seed_i, thr, inv_keep,
        HAS_SCALE=scales is not None, DROP_V=drop_v and dropout, IEEE=_common.ieee(u.dtype),
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, num_warps=warps,
    )
    return g


def multi_lora_fwd_triton(x, weight, bias, lora_A, lora_B, scaling, adapter_ids, dropout_p: float, seed):
    """x (M, K), adapter_ids (M,) -> (y (M, N), t (M, r)); any strides."""
    _common.check_dtype(x, "multi_lora")
    M, K = x.shape
    n, r, N = lora_A.shape[0], lora_A.shape[1], weight.shape[0]
    y = F.linear(x, weight, bias).contiguous()  # the frozen GEMM, once for every row
    t = torch.zeros((M, r), dtype=x.dtype, device=x.device)  # base rows keep t = 0
    if M == 0:
        return y, t
    drop = _common.dropout_args(dropout_p, seed)
    order, seg = _segments(adapter_ids, n)
    scales = torch.tensor(scaling, dtype=torch.float32, device=x.device)
    # t = drop(x)·A[a]ᵀ: W[a] = A[a]ᵀ (K, r)
    _seg_matmul(x, lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)), t, None, order, seg, n, K, r,
                drop, drop_in=True)
    # y += s·t·B[a]ᵀ: W[a] = B[a]ᵀ (r, N)
    _seg_matmul(t, lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), y, scales, order, seg, n, r, N,
                drop, accumulate=True)
    return y, t


def multi_lora_bwd_triton(dy, x, weight, lora_A, lora_B, t, scaling, adapter_ids, dropout_p: float, seed,
                          need_x: bool, need_weight: bool, need_bias: bool):
    """dy (M, N) -> (dx (M, K), dW (N, K), db (N,), dA (n, r, K), dB (n, N, r)); unneeded ones empty."""
    _common.check_dtype(x, "multi_lora")
    M, K = x.shape
    n, r, N = lora_A.shape[0], lora_A.shape[1], weight.shape[0]
    drop = _common.dropout_args(dropout_p, seed)
    order, seg = _segments(adapter_ids, n)
    scales = torch.tensor(scaling, dtype=torch.float32, device=x.device)
    # dt = s·dy·B[a]: W[a] = B[a] (N, r)
    dt = torch.zeros((M, r), dtype=x.dtype, device=x.device)
    _seg_matmul(dy, lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)), dt, scales, order, seg, n, N, r,
                drop)
    dB = _seg_outer(dy, t, scales, order, seg, n, drop)              # s·dyᵀ·t per adapter
    dA = _seg_outer(dt, x, None, order, seg, n, drop, drop_v=True)   # dtᵀ·drop(x) per adapter
    dx = x.new_empty(0)
    if need_x:
        dx = torch.mm(dy, weight).contiguous()  # the frozen GEMM's dx, once for every row
        # dx += drop(dt·A[a]): W[a] = A[a] (r, K), the mask of x's element
        _seg_matmul(dt, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), dx, None, order, seg, n,
                    r, K, drop, drop_out=True, accumulate=True)
    dW = torch.mm(dy.t(), x) if need_weight else x.new_empty(0)
    db = dy.sum(0) if need_bias else x.new_empty(0)
    return dx, dW, db, dA, dB
