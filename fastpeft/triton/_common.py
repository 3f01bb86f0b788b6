"""Device helpers shared by fastpeft's Triton kernels."""
import triton
import triton.language as tl


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
