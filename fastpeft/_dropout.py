"""Counter-based dropout masks shared by every backend.

A mask is never stored: each backend recomputes ``keep[i, j]`` from ``(seed, idx)`` with
``idx = i * cols + j`` over the logical row-major 2-D view, using the same 32-bit hash
(murmur3's finaliser). So the reference, C++ and Triton backends draw *identical* masks,
which lets tests compare dropout outputs exactly, and backward regenerates the mask
instead of saving it.

    key  = fmix32(seed + hi32(idx) * 0x9E3779B9)
    keep = fmix32(lo32(idx) ^ key) >= threshold,   threshold = round(p * 2**32)

The seed is a 0-dim int64 CPU tensor drawn from torch's default generator, so
``torch.manual_seed`` makes dropout reproducible, and ``torch.compile`` sees a tensor
rather than a Python int. Drawing from the default generator is also what keeps activation
checkpointing exact: ``torch.utils.checkpoint`` (reentrant and not) restores that generator
before it recomputes a segment, so the recomputed forward draws the same seeds, hence the same
masks, as the first one.

Several processes (data parallel): every rank seeds torch alike (so that models are built
identically) and would then draw the same seeds, i.e. the same masks for its local rows as every
other rank. :func:`set_stream` (``fastpeft.distributed.set_dropout_rank``) gives each rank its own
stream: the drawn seed is mixed with the stream number, so masks differ between ranks, stay
reproducible from ``torch.manual_seed`` + rank, and the default generator advances exactly as on
one process (stream 0 is the plain draw, bit for bit).
"""
from __future__ import annotations

from typing import Optional

import torch

_M32 = 0xFFFFFFFF
SEED_BOUND = 2**31 - 1  # seeds live in [0, 2**31) so every backend holds them as int32/uint32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on an int64 tensor holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32  # int64 product wraps mod 2**64; the low 32 bits stay exact
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def threshold(p: float) -> int:
    """uint32 threshold: an element is kept iff its hash >= threshold (keep rate 1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {p}")
    return min(int(round(p * 2**32)), _M32)


_STREAM = 0  # this process's dropout stream (set_stream); 0 = the plain draw


def set_stream(stream: int) -> None:
    """Mix ``stream`` (e.g. the data-parallel rank) into every seed :func:`new_seed` draws from
    now on, so processes that share torch's seed still draw distinct masks. 0 turns it off."""
    global _STREAM
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream <= _M32:
        raise ValueError(f"stream: expected an int in [0, 2**32), got {stream!r}")
    _STREAM = stream


def get_stream() -> int:
    return _STREAM


def new_seed(enabled: bool = True) -> Optional[torch.Tensor]:
    """Draw a dropout seed from torch's default CPU generator (None when dropout is off), mixed
    with this process's stream (:func:`set_stream`) when one is set."""
    if not enabled:
        return None
    seed = torch.randint(0, SEED_BOUND, (), dtype=torch.int64)
    if _STREAM:
        # fmix32 is a bijection of uint32 and (seed + k·odd) mod 2**32 differs for every stream k,
        # so two streams collide only through the final 31-bit mask (probability 2**-31)
        seed = fmix32((seed + _STREAM * 0x9E3779B9) & _M32) & SEED_BOUND
    return seed


def keep_mask(seed: int | torch.Tensor, p: float, rows: int, cols: int, device=None,
              row_start: int = 0) -> torch.Tensor:
    """Boolean keep-mask of shape (rows, cols) for rows ``row_start .. row_start+rows``.

    Args:
        seed: the dropout seed (int or 0-dim tensor).
        p: drop probability.
        rows, cols: logical 2-D shape of the block; ``cols`` is the full row width.
    """
    seed = int(seed)
    idx = (torch.arange(rows, device=device, dtype=torch.int64)[:, None] + row_start) * cols \
        + torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    hi = idx >> 32
    key = fmix32((seed + hi * 0x9E3779B9) & _M32)
    return fmix32((idx & _M32) ^ key) >= threshold(p)


def dropout_with_seed(x: torch.Tensor, seed, p: float) -> torch.Tensor:
    """``x * keep / (1 - p)`` over the logical 2-D view ``(-1, x.shape[-1])`` of x."""
    if seed is None or p == 0.0:
        return x
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    keep = keep_mask(seed, p, rows, cols, device=x.device).reshape(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
