"""What fastpeft's Triton kernels share: the interpreter switch, autotuning and launch, dtype
support, dropout arguments and device helpers (dot, the dropout hash).

Conventions every kernel follows (``tests/ops/test_triton_limits.py`` checks the first two on the
kernels' Triton IR and the host launches):

* **64-bit addresses.** Every product that ends up in a pointer offset is computed in int64:
  row/column indices are cast with ``.to(tl.int64)`` before they meet a stride or a size. Triton
  passes an integer argument below 2**31 as int32, so ``index * stride`` in int32 overflows once
  the product passes 2**31 (e.g. a rank index times K past 8.4M).
* **Big products on grid axis 0.** CUDA caps grid axes 1 and 2 at 65535; a launch that needs a
  product such as B·H blocks flattens it into axis 0 (up to 2**31 - 1).
* **Every operand's strides.** Inputs are read through their strides (a stride may be 0, e.g. an
  expanded bias); only buffers the host allocates itself are assumed contiguous.
* **fp32, fp16 and bf16 only.** Accumulators are fp32 and fp32 dots run in fp32 (or tf32x3) at
  best, so float64 inputs are refused (:func:`unsupported_dtype`, used by
  ``fastpeft._backend.why_not``) rather than silently computed in fp32.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fastpeft import _dropout

#: ``triton.jit`` reads TRITON_INTERPRET when a kernel module is imported; so does this module.
#: Under the interpreter there is no autotuning (no CUDA timing): callers pass fixed small tiles.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: dtypes the kernels compute correctly (fp32 accumulation)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_dtype(dtype: Optional[torch.dtype]) -> Optional[str]:
    """None if the Triton kernels handle ``dtype``, else why not (naming the alternatives)."""
    if dtype is None or dtype in SUPPORTED_DTYPES:
        return None
    if dtype == torch.float64:
        return ("the triton kernels accumulate in float32 (and multiply fp32 tiles in fp32 or tf32x3), so "
                "float64 inputs would silently lose precision; use backend='reference' (any device) or "
                "backend='cpu' (CPU tensors), which compute float64 in float64")
    return f"the triton kernels support float32, float16 and bfloat16, got {dtype}"


def check_dtype(t: torch.Tensor, family: str) -> None:
    """Raise (at the kernel entry, for calls that bypass ``fastpeft._backend``) on a dtype the
    kernels would compute wrongly."""
    reason = unsupported_dtype(t.dtype)
    if reason:
        raise TypeError(f"fastpeft: triton {family}: {reason}")


def small_tiles(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` uses the interpreter's small fixed tiles (CPU tensors run only
    under TRITON_INTERPRET=1): small, so the tests cover the loops and the edge masks."""
    return t.device.type != "cuda"


def autotune(configs, key, fixed: Optional[triton.Config] = None, **kw):
    """``triton.autotune`` on CUDA; the identity under the interpreter (callers pass tiles).

    ``FASTPEFT_TRITON_AUTOTUNE=0`` (read at import) keeps only ``fixed`` (default: the last,
    smallest config): one compile per specialisation and no timing sweep, for test runs that
    check results over many shapes (scripts/gpu_check.sh) rather than speed.
    """
    def deco(fn):
        if INTERPRET:
            return fn
        cfgs = configs
        if os.environ.get("FASTPEFT_TRITON_AUTOTUNE", "1") == "0":
            cfgs = [fixed or configs[-1]]
        return triton.autotune(configs=cfgs, key=key, **kw)(fn)
    return deco


def launch(kernel, grid_fn, args, meta, interp_cfg: dict) -> None:
    """Launch ``kernel`` with ``grid_fn(cfg)``: ``interp_cfg``'s fixed tiles under the interpreter,
    the autotuner's choice on CUDA."""
    if INTERPRET:
        kernel[grid_fn(interp_cfg)](*args, **meta, **interp_cfg)
    else:
        kernel[grid_fn](*args, **meta)


def ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs take exact fp32 products in ``dot`` (no tf32); 16-bit ones use tensor cores."""
    return dtype == torch.float32


def dropout_args(dropout_p: float, seed: Optional[torch.Tensor]):
    """(DROPOUT, seed int, uint32 keep threshold, 1/(1-p)) for the kernels."""
    if seed is None or dropout_p == 0.0:
        return False, 0, 0, 1.0
    return True, int(seed), _dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p)


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
    Apply it as a multiplication by the 0/1 mask (``v * keep``), like the reference, so a dropped
    NaN or inf stays NaN (``nan * 0``) instead of being selected away.
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
    inb = offs < rows.to(tl.int64) * cols
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
