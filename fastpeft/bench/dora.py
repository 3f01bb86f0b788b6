"""Benchmark cases for the fused DoRA linear: ``python -m fastpeft bench --op dora``.

Providers (one DoRA training step on the same x, W, b, A, B, magnitude; W and b frozen, x requires
grad), each case at dropout p = 0 and p = 0.1:

* ``frozen`` / ``frozen_onednn`` - the frozen linear on MKL / oneDNN (the floor is the faster).
* ``peft_dora`` - HF PEFT's ``lora.Linear`` with ``use_dora=True`` on the same weights, training
  mode (only when ``import peft`` works).
* ``fastpeft_lora`` - ``fastpeft.lora_linear`` (plain LoRA, same A/B): DoRA's target is <= 1.25x
  this without dropout.
* ``fastpeft`` - ``fastpeft.dora_linear(..., training=True)`` on the automatic backend.

With dropout, PEFT's DoRA sends the dropped input through W as well (four base-size GEMMs a step
instead of two), so there the target is <= 1.15x two frozen steps (ratio to the floor <= 2.3).
Modes: ``fwd``, ``bwd`` (forward untimed), ``full``; gradients reset before every repetition.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastpeft.bench import Case, autograd_preps, onednn_linear, onednn_ok
from fastpeft.bench.lora import frozen_linear

R, ALPHA = 16, 32.0
CPU_SHAPES = [(4096, 768, 768), (4096, 768, 3072)]
CUDA_SHAPES = [(8192, 4096, 4096)]
QUICK_SHAPES = [(64, 32, 48)]
MODES = ("fwd", "bwd", "full")
DROPOUTS = (0.0, 0.1)


def _peft_dora_layer(W, b, A, B, p: float):
    """HF PEFT's DoRA Linear around an nn.Linear holding W, b (frozen), with our A, B (the
    magnitude initialised by PEFT from ‖W + s·B·A‖); or None without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception:  # noqa: BLE001 - peft is an optional extra
        return None
    r = A.shape[0]
    base = frozen_linear(W, b)
    cfg = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p, use_dora=True)
    with torch.no_grad():
        layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=ALPHA, lora_dropout=p, use_dora=True,
                           init_lora_weights=False)
        layer.to(device=W.device, dtype=W.dtype)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        m = layer.lora_magnitude_vector["default"].weight
        m.copy_(torch.linalg.norm(W + (ALPHA / r) * (B @ A), dim=1))
    layer.train()
    return layer


def _providers(M, K, N, r, p, dtype, device, mode, tensors: Optional[dict] = None) -> Tuple[Dict[str, Callable], dict]:
    import fastpeft

    if tensors is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
        W = mk(N, K, scale=K ** -0.5)
        A, B = mk(r, K, scale=K ** -0.5), mk(N, r, scale=0.01)
        tensors = dict(x=mk(M, K).requires_grad_(), W=W, b=mk(N), A=A.requires_grad_(), B=B.requires_grad_(),
                       m=torch.linalg.norm(W + (ALPHA / r) * (B @ A).detach(), dim=1).detach().requires_grad_(),
                       dy=mk(M, N), peft={})
    t = tensors
    x, W, b, A, B, m, dy = t["x"], t["W"], t["b"], t["A"], t["B"], t["m"], t["dy"]
    if p not in t["peft"]:
        t["peft"][p] = _peft_dora_layer(W, b, A.detach(), B.detach(), p)
    layer = t["peft"][p]
    s = ALPHA / r
    fns: Dict[str, Callable[[], torch.Tensor]] = {"frozen": lambda: F.linear(x, W, b)}
    if onednn_ok(device, dtype):
        fns["frozen_onednn"] = lambda: onednn_linear(x, W, b)
    if layer is not None:
        fns["peft_dora"] = lambda: layer(x)
    fns["fastpeft_lora"] = lambda: fastpeft.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True)
    fns["fastpeft"] = lambda: fastpeft.dora_linear(x, W, b, A, B, m, s, dropout_p=p, training=True)
    params = [x, A, B, m] + ([] if layer is None else [q for q in layer.parameters() if q.requires_grad])
    return autograd_preps(fns, mode, dy, params), tensors


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda":
        shapes, budget, min_reps = CUDA_SHAPES, 3.0, 5
    elif quick:
        shapes, budget, min_reps = QUICK_SHAPES, 0.3, 3
    else:
        shapes, budget, min_reps = CPU_SHAPES, None, None
    out: List[Case] = []
    shared: Dict[tuple, dict] = {}
    for (M, K, N) in shapes:
        for p in DROPOUTS:
            for mode in MODES:
                provs, shared[(M, K, N)] = _providers(M, K, N, R, p, dtype, device, mode, shared.get((M, K, N)))
                b, mr = (budget, min_reps) if budget is not None else ((8.0, 5) if mode == "full" else (4.0, 4))
                out.append(Case(op="dora", mode=mode, shape=f"M={M} K={K} N={N} r={R} p={p}", dtype=dtype,
                                device=device, providers=provs, floor="frozen", ours="fastpeft",
                                min_reps=mr, budget_s=b))
    return out
