"""Test helpers shared by every op's tests: the one tolerance table and comparisons.

Fused results are compared with the reference computed in float64 from the same inputs
(upcast), then cast to the tested dtype, so the tolerance measures only the fused
kernel's own rounding.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

#: dtype -> (atol, rtol). atol is scaled by the reference's magnitude in ``assert_close``.
TOLERANCES: Dict[torch.dtype, tuple] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 3e-2),
}

DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tol(dtype: torch.dtype) -> tuple:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 name: str = "", scale: float = 1.0) -> None:
    """Assert ``actual`` matches ``expected`` within the table's tolerance for ``dtype``.

    ``atol`` is relative to ``max(1, |expected|.max())`` so sums over wide dims are judged
    by their magnitude; ``scale`` loosens both tolerances (e.g. for long reductions).
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    exp = expected.detach().to(torch.float64)
    act = actual.detach().to(torch.float64).to(exp.device)
    mag = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    torch.testing.assert_close(act, exp, atol=atol * scale * mag, rtol=rtol * scale,
                               msg=lambda m: f"{name} ({DTYPE_IDS.get(dtype, dtype)}): {m}")


def upcast(tensors: Iterable[Optional[torch.Tensor]], dtype=torch.float64):
    """Detached float64 copies (requiring grad where the original does) for the oracle."""
    out = []
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            out.append(t)
        else:
            out.append(t.detach().to(dtype).requires_grad_(t.requires_grad))
    return out


def grads(tensors: Iterable[Optional[torch.Tensor]]):
    return [None if (t is None or not isinstance(t, torch.Tensor)) else t.grad for t in tensors]
