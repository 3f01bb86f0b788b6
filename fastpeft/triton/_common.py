"""Device helpers shared by fastpeft's Triton kernels."""
import torch
import triton
import triton.language as tl

from fastpeft import _dropout


@triton.jit
def fmix32(h):
    """murmur3 finaliser on uint32 (wraps mod 2**32 like fastpeft._dropout.fmix32)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def dropout_keep(seed, idx, thr):
    """keep[idx] for int64 element indices ``idx``; bit-identical to fastpeft._dropout.keep_mask.

    seed: in [0, 2**31); thr: the uint32 threshold (arrives as i32 or i64 depending on its value).
    """
    thr = thr.to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    key = fmix32(seed.to(tl.uint32) + hi * 0x9E3779B9)
    return fmix32(lo ^ key) >= thr


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a·b; IEEE: exact fp32 products for fp32 inputs (no tf32), as the tests need."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["seed", "thr"])
def _dropout_keep_kernel(
    out_ptr,    # (rows, cols) int8 out: keep mask, contiguous
    rows, cols,
    row_start,  # logical row of out's first row (lets tests reach element indices >= 2**32)
    seed,       # dropout seed
    thr,        # uint32 keep threshold
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < rows * cols
    idx = (offs // cols + row_start) * cols + offs % cols
    tl.store(out_ptr + offs, dropout_keep(seed, idx, thr).to(tl.int8), mask=inb)


def dropout_keep_triton(seed, p: float, rows: int, cols: int, device, row_start: int = 0) -> torch.Tensor:
    """The kernels' keep-mask (rows, cols) as bool, for tests against ``fastpeft._dropout.keep_mask``
    (including element indices past 2**32)."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    n = rows * cols
    if n:
        _dropout_keep_kernel[(triton.cdiv(n, 256),)](out, rows, cols, row_start, int(seed),
                                                      _dropout.threshold(p), BLOCK=256)
    return out.bool()
