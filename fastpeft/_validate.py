"""Argument checks with errors that name the argument, the expected and the actual value."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, floating: bool = True) -> None:
    """Raise ValueError unless ``t`` is a tensor matching every given constraint.

    ``shape`` entries of None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            exp = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {exp}, got {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype} (to match the input), got {t.dtype}")
    if device is not None and t.device != (device if isinstance(device, torch.device) else torch.device(device)):
        raise ValueError(f"{name}: expected device {device} (to match the input), got {t.device}")


def check_optional(name: str, t, **kw) -> None:
    if t is not None:
        check_tensor(name, t, **kw)


def check_dropout(p, name: str = "dropout_p") -> float:
    """``p`` as a float in [0, 1); checked whether or not dropout is active (training)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {p!r}")
    return float(p)


def check_scaling(s, *, allow_inf: bool = False) -> float:
    """A float scaling (or a one-element tensor's value). NaN is refused; ±inf only with
    ``allow_inf`` (the op then follows its reference for infinite scales)."""
    if isinstance(s, torch.Tensor):
        if s.numel() != 1:
            raise ValueError(f"scaling: expected a float, got a tensor of shape {tuple(s.shape)}")
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"scaling: expected a float, got {type(s).__name__}")
    s = float(s)
    if math.isnan(s) or (math.isinf(s) and not allow_inf):
        raise ValueError(f"scaling: expected a finite float, got {s!r}" if not allow_inf
                         else f"scaling: expected a float that is not NaN, got {s!r}")
    return s


def check_linear(x, weight, bias):
    """x (..., K), weight (N, K) and bias (N,) or None of one dtype and device: the frozen linear every
    LoRA-family op wraps. Returns (K, N)."""
    check_tensor("x", x, min_ndim=1)
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device)
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight: expected shape (N, {K}) to match x's last dim, got {tuple(weight.shape)}")
    check_optional("bias", bias, shape=(N,), dtype=x.dtype, device=x.device)
    return K, N
