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


def rel_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |actual - oracle| / max |oracle| (the oracle in float64)."""
    exp = oracle.detach().to(torch.float64)
    act = actual.detach().to(torch.float64).to(exp.device)
    if exp.numel() == 0:
        return 0.0
    return ((act - exp).abs().max() / exp.abs().max().clamp_min(1e-30)).item()


def assert_as_accurate(actual: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, name: str = "",
                       factor: float = 2.0) -> None:
    """Low-precision check by the error PyTorch itself makes: ``actual``'s error against the float64
    ``oracle`` is at most ``factor`` times ``eager``'s (the same computation in plain PyTorch in the
    same dtype), with a floor of one ulp-ish (2**-10 relative) so exact eager results don't demand
    exactness."""
    e_act, e_eager = rel_err(actual, oracle), rel_err(eager, oracle)
    bound = factor * max(e_eager, 2.0 ** -10)
    assert e_act <= bound, f"{name}: relative error {e_act:.3e} > {factor}x eager's {e_eager:.3e}"


def cpu_configs(call) -> list:
    """Names of the run-time configurations a C++ CPU op offers for a call (``call()`` runs it),
    read from the error that an unknown FASTPEFT_CPU_CONFIG raises."""
    import os
    import re

    old = os.environ.get("FASTPEFT_CPU_CONFIG")
    os.environ["FASTPEFT_CPU_CONFIG"] = "?"
    try:
        call()
    except RuntimeError as e:
        m = re.search(r"available: ([^\n]*)", str(e))
        if m is None:
            raise
        return [c.strip() for c in m.group(1).split(",")]
    finally:
        if old is None:
            os.environ.pop("FASTPEFT_CPU_CONFIG", None)
        else:
            os.environ["FASTPEFT_CPU_CONFIG"] = old
    raise AssertionError("FASTPEFT_CPU_CONFIG='?' was accepted")
