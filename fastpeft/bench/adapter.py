"""Benchmark cases for the fused bottleneck adapter: ``python -m fastpeft bench --op adapter``.

Providers (one sequential adapter ``y = x + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu)`` on the same x and
weights; x and every adapter parameter require grad, as mid-network in fine-tuning):

* ``copy``     - the floor, one read and one write of x (the adapter's minimum memory traffic):
  ``x.clone()`` on CPU (a fresh output, as every provider's is); on CUDA ``y.copy_(x)`` into a
  preallocated y of the same bytes, the device's copy bandwidth, so ``copy time / fastpeft time``
  is the fraction of copy bandwidth the forward reaches (scripts/gpu_acceptance.py also counts
  the backward's bytes).
* ``eager``    - the plain-PyTorch adapter as a user writes it:
  ``x + s * F.linear(act(F.linear(x, Wd, bd)), Wu, bu)``.
* ``eager_onednn`` - the same eager adapter with both linears done by oneDNN (CPU fp32 only):
  fastpeft's C++ backend calls oneDNN for its GEMMs (csrc/gemm.h) where ``F.linear`` goes to
  MKL, so this row separates what the GEMM library buys from what fusion buys.
* ``compile``  - ``torch.compile`` of the eager function (compiled during the untimed warm-up;
  left out with ``quick``).
* ``fastpeft`` - ``fastpeft.adapter(..., training=True)`` on the automatic backend.

Modes: ``fwd`` (forward with the autograd graph recorded), ``bwd`` (backward only: the forward
runs untimed in prep), ``full`` (forward + backward, one training step). Gradients are reset to
None before every repetition so no provider pays for gradient accumulation.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastpeft.bench import Case, autograd_preps, compiled, onednn_linear, onednn_ok

ACT, SCALING, P = "gelu", 0.1, 0.0  # acceptance configuration: GELU, scaling 0.1, no dropout

# (M tokens, d, m bottleneck): the CPU acceptance shape in every mode plus a smaller M (step only).
CPU_SHAPES = [(8192, 768, 64)]
CPU_SMALL = [(2048, 768, 64), (4096, 1024, 16)]
CUDA_SHAPES = [(16384, 4096, 64)]
QUICK_SHAPES = [(64, 32, 8)]
MODES = ("fwd", "bwd", "full")


def _act(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def _eager(x, Wd, bd, Wu, bu, s: float):
    return x + s * F.linear(_act(F.linear(x, Wd, bd)), Wu, bu)


def _providers(M: int, d: int, m: int, dtype: torch.dtype, device: torch.device, mode: str,
               tensors: Optional[dict] = None, with_compile: bool = True) -> Tuple[Dict[str, Callable], dict]:
    """Provider preps for one (shape, mode); ``tensors`` shares inputs between modes of a shape."""
    import fastpeft

    if tensors is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
        tensors = dict(x=mk(M, d).requires_grad_(), Wd=mk(m, d, scale=d ** -0.5).requires_grad_(),
                       bd=mk(m).requires_grad_(), Wu=mk(d, m, scale=m ** -0.5).requires_grad_(),
                       bu=mk(d).requires_grad_(), dy=mk(M, d))
    t = tensors
    x, Wd, bd, Wu, bu, dy = t["x"], t["Wd"], t["bd"], t["Wu"], t["bu"], t["dy"]
    if device.type == "cuda":
        if "copy_out" not in t:
            t["copy_out"] = torch.empty_like(x, requires_grad=False)
        out, xd = t["copy_out"], x.detach()
        copy = lambda: out.copy_(xd)  # noqa: E731 - the same bytes as x, read once and written once
    else:
        copy = lambda: x.detach().clone()  # noqa: E731
    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "copy": copy,
        "eager": lambda: _eager(x, Wd, bd, Wu, bu, SCALING),
    }
    if onednn_ok(device, dtype):
        fns["eager_onednn"] = lambda: x + SCALING * onednn_linear(_act(onednn_linear(x, Wd, bd)), Wu, bu)
    if with_compile:
        comp = compiled(_eager)
        fns["compile"] = lambda: comp(x, Wd, bd, Wu, bu, SCALING)
    fns["fastpeft"] = lambda: fastpeft.adapter(x, Wd, bd, Wu, bu, ACT, SCALING, dropout_p=P, training=True)
    return autograd_preps(fns, mode, dy, [x, Wd, bd, Wu, bu], no_grad=("copy",)), tensors


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda":
        plan = [(s, m) for s in CUDA_SHAPES for m in MODES]
    elif quick:
        plan = [(s, m) for s in QUICK_SHAPES for m in MODES]
    else:
        plan = ([(s, m) for s in CPU_SHAPES for m in MODES] + [(s, "full") for s in CPU_SMALL]
                + [((4096, 1024, 16), "fwd")])
    out: List[Case] = []
    shared: Dict[tuple, dict] = {}
    for (M, d, m), mode in plan:
        provs, shared[(M, d, m)] = _providers(M, d, m, dtype, device, mode, shared.get((M, d, m)),
                                              with_compile=not quick)
        if device.type == "cuda":
            b, mr = 3.0, 5
        elif quick:
            b, mr = 0.3, 3
        else:  # CPU defaults: the whole run fits in about 2 minutes on 2 cores
            b, mr = (7.0, 8) if M >= 8192 else (3.0, 8)
        out.append(Case(op="adapter", mode=mode, shape=f"M={M} d={d} m={m} act={ACT} s={SCALING}",
                        dtype=dtype, device=device, providers=provs, floor="copy", ours="fastpeft",
                        min_reps=mr, budget_s=b))
    return out
