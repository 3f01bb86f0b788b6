"""Fused bottleneck adapter in Triton: ``y = R + s ⊙ (drop(act(x·Wdᵀ + bd))·Wuᵀ + bu)``.

Kernels (the adapter kernel contract in ``fastpeft/ops/adapter.py``):

* ``adapter_fwd_triton`` -> ``_adapter_fwd_kernel``: one program per block of rows. It runs
  the down-projection over d in tiles (fp32 accumulator), adds ``bd``, writes the
  pre-activation ``z`` (M, m) (the only thing backward keeps), applies the activation and
  the counter-hash dropout in registers, then loops over d again for the up-projection,
  adding ``bu``, multiplying by ``scale`` and adding the residual before the one store of
  ``y``. The bottleneck activation and the up-projection output never touch memory.

* ``adapter_bwd_triton`` -> two kernels:

  1. ``_adapter_bwd_dz_kernel`` (one program per row block): recomputes ``h = drop(act(z))``
     and ``act'(z)`` from z, loops over d reading ``dy`` once to form
     ``dh = dy·(scale ⊙ Wu)``, and writes ``dz = act'(z) ⊙ keep/(1-p) ⊙ dh`` and ``h``
     (both (M, m): 2·m/d of one pass over dy) plus per-row-block partial sums of dz (dbd).
  2. ``_adapter_bwd_dw_kernel`` (one program per (d-tile, slice of rows)): streams dy and x
     once, writes ``dx = dz·Wd (+ dy)`` and accumulates ``G = dyᵀ·h``, ``dWd = dzᵀ·x`` and
     ``colsum(dy)`` over its rows in registers; each of the S row slices writes one fp32
     partial, summed by torch. Then (tiny (d, m) work in torch) ``dWu = scale ⊙ G``,
     ``dbu = scale ⊙ colsum(dy)``, ``d_scale = rowsum(Wu ⊙ G) + bu ⊙ colsum(dy)``
     (so u = h·Wuᵀ is never recomputed).

Why two backward kernels and partial buffers rather than one row-block kernel with atomics:
``dz`` needs all of d before ``dx`` and ``dWd`` can start, and reducing the weight gradients
(2·m·d values) once per row block costs about as much traffic as the activations when the
row block is ~m rows: per d-column and row block, 2·m fp32 atomics = 512 B against
3·BLOCK_M·2 B = 768 B of dy/x/dx (bf16, m = 64, BLOCK_M = 128), ~67 % extra, all
contending on the same 2·m·d addresses. The d-tile kernel reduces
over a whole slice of rows in registers, so only S ≈ 2·SMs/(d/BLOCK_N) partials are written
(a few % of the traffic), and a torch sum of them is deterministic, unlike fp32 atomics.
The cost is one extra read of dy (kernel 1): four (M, d) passes in all against the
minimum three (dy, x, dx).

Dropout uses ``fastpeft._dropout``'s hash (uint32 murmur3 finaliser of seed and the element
index ``i*m + j``), so masks are bit-identical to the reference and C++ backends.

Limits: the bottleneck is held in registers, padded to ``BLOCK_B = max(16, next_pow2(m))``
(``tl.dot`` needs dims >= 16); m > 256 raises ValueError. fp16/bf16 multiply on tensor cores
with fp32 accumulation; fp32 uses ``input_precision="tf32x3"`` on a GPU (tensor cores, about
fp32-accurate) and ``"ieee"`` in the interpreter, so results are tight; float64 is refused
(``_common.unsupported_dtype``). Every operand is read through its strides (biases too: sliced
or expanded stride-0 biases are fine) and every address product is int64
(``fastpeft/triton/_common.py``).

Non-finite values follow the reference: ReLU keeps NaN (``relu(nan) = nan``) and passes the
gradient through at NaN (torch's ``threshold_backward``: zero only where ``z <= 0``); dropout
multiplies by the 0/1 mask, so a dropped NaN/inf stays NaN. (On a GPU, fp32 dots in tf32x3 split
each operand into a tf32 part and a remainder, and the remainder of ±inf is NaN: fp32 inputs with
±inf give NaN where the reference gives ±inf.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.triton import _common
from fastpeft.triton._common import dropout_keep as _keep

#: name -> tl.constexpr code used by the kernels
_ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
#: the largest bottleneck kept in registers (h is BLOCK_M x BLOCK_B per program)
MAX_BOTTLENECK = 256


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _tanh(a):
    # tanh via exp(-2|a|) in (0, 1]: never overflows, saturates to +-1 for large |a|
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.0, -t, t)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) in fp32; ACT: 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu."""
    if ACT == 1:
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN (tl.maximum would return 0), like torch.relu
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * z * (1.0 + t)
    elif ACT == 4:
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) in fp32, the same formulas as fastpeft.reference.adapter.activation_grad."""
    if ACT == 1:
        return tl.where(z <= 0.0, 0.0, 1.0)  # 1 at NaN: torch's relu backward passes the gradient there
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    elif ACT == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 4:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "thr"])  # 0/1 values must stay tensors
def _adapter_fwd_kernel(
    x_ptr,      # (M, d) input, strides (sxm, sxd)
    wd_ptr,     # (m, d) down_weight, strides (swd_m, swd_d)
    bd_ptr,     # (m,) down_bias, stride sbd (unused when HAS_BD is False)
    wu_ptr,     # (d, m) up_weight, strides (swu_d, swu_m)
    bu_ptr,     # (d,) up_bias, stride sbu (unused when HAS_BU is False)
    s_ptr,      # (d,) scale, stride ss (0 for an expanded scalar)
    r_ptr,      # (M, d) residual, strides (srm, srd); x itself when the adapter is sequential
    y_ptr,      # (M, d) output, contiguous
    z_ptr,      # (M, m) pre-activation output, contiguous
    M, d, m,
    sxm, sxd, swd_m, swd_d, sbd, swu_d, swu_m, sbu, ss, srm, srd,
    seed,       # dropout seed (int, < 2**31)
    thr,        # uint32 keep threshold (an element is kept iff hash >= thr)
    inv_keep,   # 1 / (1 - p)
    HAS_BD: tl.constexpr,    # down_bias given
    HAS_BU: tl.constexpr,    # up_bias given
    ACT: tl.constexpr,       # activation code (see _act)
    DROPOUT: tl.constexpr,   # dropout active (p > 0)
    PREC: tl.constexpr,      # tl.dot input_precision: "tf32x3" (fp32 on GPU), "ieee" (interpreter)
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_B: tl.constexpr,   # padded bottleneck (>= 16, power of two, >= m)
    BLOCK_D: tl.constexpr,   # d-tile of both projections
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M*d may exceed 2**31
    rmask = rows < M
    cb = tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = cb < m
    cd = tl.arange(0, BLOCK_D).to(tl.int64)

    # ---- down-projection: z = x·Wdᵀ (+ bd), fp32 accumulator (BLOCK_M, BLOCK_B)
    z = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        ck = k0 + cd
        kmask = ck < d
        xt = tl.load(x_ptr + rows[:, None] * sxm + ck[None, :] * sxd,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        # Wdᵀ tile (BLOCK_D, BLOCK_B); padded bottleneck columns load 0 so they add nothing
        wdt = tl.load(wd_ptr + cb[None, :] * swd_m + ck[:, None] * swd_d,
                      mask=kmask[:, None] & bmask[None, :], other=0.0)
        z = tl.dot(xt, wdt, z, input_precision=PREC)
    if HAS_BD:
        z += tl.load(bd_ptr + cb * sbd, mask=bmask, other=0.0).to(tl.float32)[None, :]
    # padded bottleneck columns hold x·0, which is NaN where x is ±inf: zero them so h·Wuᵀ
    # only sums the m real columns (act(0) = 0 for every activation)
    z = tl.where(bmask[None, :], z, 0.0)
    zmask = rmask[:, None] & bmask[None, :]
    tl.store(z_ptr + rows[:, None] * m + cb[None, :], z.to(z_ptr.dtype.element_ty), mask=zmask)

    # ---- activation + dropout in registers (padded columns: act(0) = 0 for every activation)
    h = _act(z, ACT)
    if DROPOUT:  # h·mask/(1-p) like the reference: a dropped NaN/inf gives NaN
        keep = _keep(seed, rows[:, None] * m + cb[None, :], thr)
        h = h * (keep.to(tl.float32) * inv_keep)
    h = h.to(x_ptr.dtype.element_ty)  # tensor-core operand in the input dtype, like the reference

    # ---- up-projection, bias, scale, residual: y = R + scale ⊙ (h·Wuᵀ + bu)
    for n0 in range(0, d, BLOCK_D):
        cn = n0 + cd
        nmask = cn < d
        # Wuᵀ tile (BLOCK_B, BLOCK_D)
        wut = tl.load(wu_ptr + cn[None, :] * swu_d + cb[:, None] * swu_m,
                      mask=bmask[:, None] & nmask[None, :], other=0.0)
        u = tl.dot(h, wut, input_precision=PREC)
        if HAS_BU:
            u += tl.load(bu_ptr + cn * sbu, mask=nmask, other=0.0).to(tl.float32)[None, :]
        sc = tl.load(s_ptr + cn * ss, mask=nmask, other=0.0).to(tl.float32)
        omask = rmask[:, None] & nmask[None, :]
        res = tl.load(r_ptr + rows[:, None] * srm + cn[None, :] * srd, mask=omask, other=0.0)
        y = res.to(tl.float32) + sc[None, :] * u
        tl.store(y_ptr + rows[:, None] * d + cn[None, :], y.to(y_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "thr"])
def _adapter_bwd_dz_kernel(
    dy_ptr,     # (M, d) upstream gradient, strides (sdym, sdyd)
    wu_ptr,     # (d, m) up_weight, strides (swu_d, swu_m)
    s_ptr,      # (d,) scale, stride ss
    z_ptr,      # (M, m) saved pre-activation, strides (szm, szb)
    h_ptr,      # (M, m) out: recomputed drop(act(z)), contiguous, input dtype (for dWu in kernel 2)
    dz_ptr,     # (M, m) out: gradient of z, contiguous, input dtype
    dbd_ptr,    # (cdiv(M, BLOCK_M), m) out: fp32 per-row-block column sums of dz
    M, d, m,
    sdym, sdyd, swu_d, swu_m, ss, szm, szb,
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    inv_keep,   # 1 / (1 - p)
    ACT: tl.constexpr,       # activation code
    DROPOUT: tl.constexpr,   # dropout active
    PREC: tl.constexpr,      # tl.dot input_precision (see _precision)
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_B: tl.constexpr,   # padded bottleneck
    BLOCK_D: tl.constexpr,   # d-tile
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < M
    cb = tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = cb < m
    zmask = rmask[:, None] & bmask[None, :]
    cd = tl.arange(0, BLOCK_D).to(tl.int64)

    # recompute the activation (cheaper than storing it in forward) and regenerate the mask
    z = tl.load(z_ptr + rows[:, None] * szm + cb[None, :] * szb, mask=zmask, other=0.0).to(tl.float32)
    h = _act(z, ACT)
    dmul = _act_grad(z, ACT)
    if DROPOUT:  # multiplied, not selected, like the reference (a dropped NaN/inf gives NaN)
        keep = _keep(seed, rows[:, None] * m + cb[None, :], thr).to(tl.float32) * inv_keep
        h = h * keep
        dmul = dmul * keep
    tl.store(h_ptr + rows[:, None] * m + cb[None, :], h.to(h_ptr.dtype.element_ty), mask=zmask)

    # dh = (dy ⊙ scale)·Wu, folded as dy·(scale ⊙ Wu) so the scale touches the small tile
    dh = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, d, BLOCK_D):
        cn = n0 + cd
        nmask = cn < d
        dyt = tl.load(dy_ptr + rows[:, None] * sdym + cn[None, :] * sdyd,
                      mask=rmask[:, None] & nmask[None, :], other=0.0)
        wut = tl.load(wu_ptr + cn[:, None] * swu_d + cb[None, :] * swu_m,
                      mask=nmask[:, None] & bmask[None, :], other=0.0)
        sc = tl.load(s_ptr + cn * ss, mask=nmask, other=0.0).to(tl.float32)
        wus = (wut.to(tl.float32) * sc[:, None]).to(dy_ptr.dtype.element_ty)
        dh = tl.dot(dyt, wus, dh, input_precision=PREC)
    dz = dh * dmul  # rows/cols outside the matrix are 0 here (masked dy / Wu)
    tl.store(dz_ptr + rows[:, None] * m + cb[None, :], dz.to(dz_ptr.dtype.element_ty), mask=zmask)
    tl.store(dbd_ptr + pid.to(tl.int64) * m + cb, tl.sum(dz, axis=0), mask=bmask)


@triton.jit
def _adapter_bwd_dw_kernel(
    dy_ptr,     # (M, d) upstream gradient, strides (sdym, sdyd)
    x_ptr,      # (M, d) input, strides (sxm, sxd)
    wd_ptr,     # (m, d) down_weight, strides (swd_m, swd_d)
    h_ptr,      # (M, m) drop(act(z)) from kernel 1, contiguous
    dz_ptr,     # (M, m) gradient of z from kernel 1, contiguous
    dx_ptr,     # (M, d) out: gradient of x, contiguous (unused when NEED_X is False)
    g_ptr,      # (S, d, m) out: fp32 partials of G = dyᵀ·h, one per row slice
    dwd_ptr,    # (S, m, d) out: fp32 partials of dWd = dzᵀ·x
    cs_ptr,     # (S, d) out: fp32 partials of colsum(dy)
    M, d, m,
    rows_per_slice,  # rows handled by one program (a multiple of BLOCK_M)
    sdym, sdyd, sxm, sxd, swd_m, swd_d,
    NEED_X: tl.constexpr,         # write dx
    RESIDUAL_IS_X: tl.constexpr,  # dx also carries dy (sequential adapter, R = x)
    PREC: tl.constexpr,           # tl.dot input_precision (see _precision)
    BLOCK_M: tl.constexpr,        # rows per step of the row loop (the dot's K for dWd / G)
    BLOCK_B: tl.constexpr,        # padded bottleneck
    BLOCK_N: tl.constexpr,        # d-tile owned by this program
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = cn < d
    cb = tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = cb < m
    rm = tl.arange(0, BLOCK_M).to(tl.int64)

    if NEED_X:
        # the Wd tile is the same for every row: load it once per program
        wdt = tl.load(wd_ptr + cb[:, None] * swd_m + cn[None, :] * swd_d,
                      mask=bmask[:, None] & nmask[None, :], other=0.0)
    g_acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    dwd_acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    cs_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row0 = pid_s.to(tl.int64) * rows_per_slice
    row_end = tl.minimum(row0 + rows_per_slice, M)
    for r0 in range(row0, row_end, BLOCK_M):
        rows = r0 + rm
        rmask = rows < row_end
        tmask = rmask[:, None] & nmask[None, :]
        bm = rmask[:, None] & bmask[None, :]
        dyt = tl.load(dy_ptr + rows[:, None] * sdym + cn[None, :] * sdyd, mask=tmask, other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * sxm + cn[None, :] * sxd, mask=tmask, other=0.0)
        ht = tl.load(h_ptr + rows[:, None] * m + cb[None, :], mask=bm, other=0.0)
        dzt = tl.load(dz_ptr + rows[:, None] * m + cb[None, :], mask=bm, other=0.0)
        g_acc = tl.dot(tl.trans(dyt), ht, g_acc, input_precision=PREC)
        dwd_acc = tl.dot(tl.trans(dzt), xt, dwd_acc, input_precision=PREC)
        cs_acc += tl.sum(dyt.to(tl.float32), axis=0)
        if NEED_X:
            dx = tl.dot(dzt, wdt, input_precision=PREC)
            if RESIDUAL_IS_X:
                dx += dyt.to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * d + cn[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tmask)

    base = pid_s.to(tl.int64)
    tl.store(g_ptr + base * d * m + cn[:, None] * m + cb[None, :], g_acc,
             mask=nmask[:, None] & bmask[None, :])
    tl.store(dwd_ptr + base * m * d + cb[:, None] * d + cn[None, :], dwd_acc,
             mask=bmask[:, None] & nmask[None, :])
    tl.store(cs_ptr + base * d + cn, cs_acc, mask=nmask)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def _block_b(m: int) -> int:
    if m > MAX_BOTTLENECK:
        raise ValueError(f"down_weight: the triton adapter keeps the bottleneck in registers and supports "
                         f"m <= {MAX_BOTTLENECK}, got m = {m}; use backend='cpu' or 'reference'")
    return max(16, triton.next_power_of_2(m))


def gpu_fwd_config(block_b: int, elem_size: int):
    """(BLOCK_M, BLOCK_D, num_warps) of the row-block kernels on an H100 (no autotuning, so
    the first call does not pay for a sweep).

    Big row blocks so Wd/Wu, re-read from L2 by every row block, cost less than the x/y
    stream; the fp32 z accumulator, h and one u tile must fit the register file (checked
    with ptxas: no spills for 2-byte dtypes); 4-byte inputs take half the rows.
    """
    block_m = 128 if block_b <= 64 else 64 if block_b <= 128 else 32
    if elem_size >= 4:
        block_m //= 2
    return max(16, block_m), 64, 8


def gpu_dw_config(block_b: int, elem_size: int):
    """(BLOCK_M, BLOCK_N, num_warps) of the weight-gradient kernel on an H100: two
    (BLOCK_N x BLOCK_B) fp32 accumulators live through the whole row loop."""
    block_n = 128 if block_b <= 64 else 64 if block_b <= 128 else 32
    block_m = 64
    if elem_size >= 4:  # fp32 operands + tf32x3 splits: ptxas spills above these sizes
        block_n, block_m = (64 if block_b <= 16 else 32 if block_b <= 64 else 16), (32 if block_b <= 64 else 16)
    return block_m, block_n, 8


def _fwd_config(x: torch.Tensor, block_b: int):
    if _common.small_tiles(x):
        return 16, 32, 4
    return gpu_fwd_config(block_b, x.element_size())


def _dw_config(x: torch.Tensor, block_b: int):
    """(BLOCK_M, BLOCK_N, num_warps, target number of programs)."""
    if _common.small_tiles(x):
        return 16, 32, 4, 8
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return (*gpu_dw_config(block_b, x.element_size()), 2 * sms)


def _precision(x: torch.Tensor) -> str:
    """tl.dot input_precision. fp32 on a GPU: "tf32x3" (three tf32 tensor-core products, ~fp32
    accurate; "ieee" would fall back to FMA loops that spill registers). The interpreter uses
    "ieee". 16-bit inputs ignore it (native tensor-core dot, fp32 accumulation)."""
    if x.dtype == torch.float32 and not _common.small_tiles(x):
        return "tf32x3"
    return "ieee"


def _act_code(activation: str) -> int:
    try:
        return _ACT_CODES[activation]
    except KeyError:
        raise ValueError(f"activation: expected one of {tuple(_ACT_CODES)}, got {activation!r}") from None


def adapter_fwd_triton(x, down_weight, down_bias, up_weight, up_bias, scale, residual, activation: str,
                       dropout_p: float, seed):
    """x (M, d) -> (y (M, d), z (M, m)); any strides (scale and biases may be stride-0 views)."""
    _common.check_dtype(x, "adapter")
    M, d = x.shape
    m = down_weight.shape[0]
    block_b = _block_b(m)
    act = _act_code(activation)
    y = torch.empty((M, d), dtype=x.dtype, device=x.device)
    z = torch.empty((M, m), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, z
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    r = x if residual is None else residual
    block_m, block_d, warps = _fwd_config(x, block_b)
    grid = (triton.cdiv(M, block_m),)
    _adapter_fwd_kernel[grid](
        x, down_weight, down_weight if down_bias is None else down_bias, up_weight,
        up_weight if up_bias is None else up_bias, scale, r, y, z,
        M, d, m,
        x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1),
        0 if down_bias is None else down_bias.stride(0), up_weight.stride(0), up_weight.stride(1),
        0 if up_bias is None else up_bias.stride(0), scale.stride(0), r.stride(0), r.stride(1),
        seed_i, thr, inv_keep,
        HAS_BD=down_bias is not None, HAS_BU=up_bias is not None, ACT=act, DROPOUT=dropout,
        PREC=_precision(x), BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=warps, num_stages=3,
    )
    return y, z


def adapter_bwd_triton(dy, x, down_weight, up_weight, up_bias, z, scale, activation: str, dropout_p: float,
                       seed, residual_is_x: bool, need_x: bool, need_scale: bool):
    """dy (M, d) -> (dx (M, d), dWd (m, d), dbd (m,), dWu (d, m), dbu (d,), dscale (d,)).

    Unneeded dx / dscale are returned empty (the contract).
    """
    _common.check_dtype(x, "adapter")
    M, d = x.shape
    m = down_weight.shape[0]
    block_b = _block_b(m)
    act = _act_code(activation)
    dev, dt = x.device, x.dtype
    dx = torch.empty((M, d) if need_x else (0,), dtype=dt, device=dev)
    if M == 0 or d == 0:  # empty sums: every gradient is zero (dz = act'(z) ⊙ dy·Wus = 0 at d = 0)
        zeros = lambda *s: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        ds = zeros(d) if need_scale else x.new_empty(0)
        return dx, zeros(m, d), zeros(m), zeros(d, m), zeros(d), ds
    dropout, seed_i, thr, inv_keep = _common.dropout_args(dropout_p, seed)
    prec = _precision(x)

    # kernel 1: dz, h (M, m) and per-row-block sums of dz
    block_m, block_d, warps = _fwd_config(x, block_b)
    nrb = triton.cdiv(M, block_m)
    h = torch.empty((M, m), dtype=dt, device=dev)
    dz = torch.empty((M, m), dtype=dt, device=dev)
    dbd_part = torch.empty((nrb, m), dtype=torch.float32, device=dev)
    _adapter_bwd_dz_kernel[(nrb,)](
        dy, up_weight, scale, z, h, dz, dbd_part,
        M, d, m,
        dy.stride(0), dy.stride(1), up_weight.stride(0), up_weight.stride(1), scale.stride(0),
        z.stride(0), z.stride(1),
        seed_i, thr, inv_keep,
        ACT=act, DROPOUT=dropout, PREC=prec, BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=warps, num_stages=3,
    )

    # kernel 2: dx and the (S-way partial) weight-gradient reductions over rows
    bm2, block_n, warps2, target = _dw_config(x, block_b)
    n_tiles = triton.cdiv(d, block_n)
    row_blocks = triton.cdiv(M, bm2)
    slices = max(1, min(row_blocks, triton.cdiv(target, n_tiles)))
    rows_per_slice = triton.cdiv(row_blocks, slices) * bm2
    slices = triton.cdiv(M, rows_per_slice)  # no empty slices
    g_part = torch.empty((slices, d, m), dtype=torch.float32, device=dev)
    dwd_part = torch.empty((slices, m, d), dtype=torch.float32, device=dev)
    cs_part = torch.empty((slices, d), dtype=torch.float32, device=dev)
    _adapter_bwd_dw_kernel[(n_tiles, slices)](
        dy, x, down_weight, h, dz, dx if need_x else dy, g_part, dwd_part, cs_part,
        M, d, m, rows_per_slice,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1),
        NEED_X=need_x, RESIDUAL_IS_X=residual_is_x, PREC=prec, BLOCK_M=bm2, BLOCK_B=block_b,
        BLOCK_N=block_n, num_warps=warps2, num_stages=2,  # 4 tiles in flight per stage: keep smem in bounds
    )

    # tiny (d, m)-sized epilogue: sum the S partials, apply the scale
    G = g_part.sum(0) if slices > 1 else g_part[0]
    cs = cs_part.sum(0) if slices > 1 else cs_part[0]
    d_down_weight = (dwd_part.sum(0) if slices > 1 else dwd_part[0]).to(dt)
    d_down_bias = dbd_part.sum(0).to(dt)
    s32 = scale.to(torch.float32)
    d_up_weight = (s32[:, None] * G).to(dt)
    d_up_bias = (s32 * cs).to(dt)
    if need_scale:
        ds = (up_weight.to(torch.float32) * G).sum(1)
        if up_bias is not None:
            ds = ds + up_bias.to(torch.float32) * cs
        d_scale = ds.to(dt)
    else:
        d_scale = x.new_empty(0)
    return dx, d_down_weight, d_down_bias, d_up_weight, d_up_bias, d_scale
