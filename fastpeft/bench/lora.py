"""Benchmark cases for the fused LoRA linear: ``python -m fastpeft bench --op lora``.

Providers (one LoRA training step on the same x, W, b, A, B; W and b frozen, x requires grad):

* ``frozen``   - ``F.linear(x, W, b)``: the floor, what the layer costs without LoRA.
* ``frozen_onednn`` - the same frozen linear with its GEMMs done by oneDNN (CPU fp32 only).
  ``F.linear`` goes to MKL's sgemm; which library is faster depends on the CPU (oneDNN ~2x on an
  AMD EPYC, MKL 4-15% on an Intel Xeon with AMX), and fastpeft's C++ backend picks per machine
  (csrc/tune.h). The honest floor is the faster of the two rows.
* ``eager``    - plain-PyTorch LoRA as a user writes it:
  ``F.linear(x, W, b) + s·F.linear(F.linear(F.dropout(x, p), A), B)``.
* ``peft``     - HF PEFT's ``peft.tuners.lora.Linear`` wrapping the same ``nn.Linear`` with the
  same A/B, in training mode (only when ``import peft`` works).
* ``compile``  - ``torch.compile`` of the eager function (compiled during the untimed warm-up;
  left out with ``quick``, whose whole run takes a few seconds).
* ``fastpeft`` - ``fastpeft.lora_linear(..., training=True)`` on the automatic backend.

Modes: ``fwd`` (forward with the autograd graph recorded), ``bwd`` (backward only: the forward
runs untimed in prep), ``full`` (forward + backward). Gradients are reset to None before every
repetition so no provider pays for gradient accumulation.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.bench import Case, autograd_preps, compiled, onednn_linear, onednn_ok

R, P, ALPHA = 16, 0.1, 32.0  # rank, dropout, lora_alpha (scaling = alpha / r = 2)

# CPU defaults: the acceptance shapes (M tokens, K in, N out) in every mode, plus a token
# sweep at K = N = 768 (training step only) for the ratio-vs-tokens plot.
CPU_SHAPES = [(4096, 768, 768), (4096, 768, 3072), (512, 4096, 4096)]
CPU_SWEEP = [(512, 768, 768), (1024, 768, 768), (2048, 768, 768), (2048, 384, 384)]
CUDA_SHAPES = [(8192, 4096, 4096)]
QUICK_SHAPES = [(64, 32, 48)]
MODES = ("fwd", "bwd", "full")


def _eager(x, W, b, A, B, s: float, p: float):
    return F.linear(x, W, b) + s * F.linear(F.linear(F.dropout(x, p, training=True), A), B)


def frozen_linear(W: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` holding W (N, K) and b (N,): the base layer PEFT's layers wrap."""
    N, K = W.shape
    base = nn.Linear(K, N, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    return base.requires_grad_(False)


def _peft_layer(W: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor, p: float):
    """HF PEFT's LoRA Linear around an nn.Linear holding W, b (frozen), with our A, B; or None."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception:  # noqa: BLE001 - peft is an optional extra
        return None
    r = A.shape[0]
    base = frozen_linear(W, b)
    cfg = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=ALPHA, lora_dropout=p)
    layer.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.train()
    return layer


def _providers(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, device: torch.device,
               mode: str, tensors: Optional[dict] = None, with_compile: bool = True) -> Tuple[Dict[str, Callable], dict]:
    """Provider preps for one (shape, mode); ``tensors`` shares inputs between modes of a shape."""
    import fastpeft

    if tensors is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
        tensors = dict(x=mk(M, K).requires_grad_(), W=mk(N, K, scale=K ** -0.5), b=mk(N),
                       A=mk(r, K, scale=K ** -0.5).requires_grad_(), B=mk(N, r, scale=r ** -0.5).requires_grad_(),
                       dy=mk(M, N))
        tensors["peft"] = _peft_layer(tensors["W"], tensors["b"], tensors["A"].detach(), tensors["B"].detach(), p)
    t = tensors
    x, W, b, A, B, dy = t["x"], t["W"], t["b"], t["A"], t["B"], t["dy"]
    s = ALPHA / r
    layer = t["peft"]

    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "frozen": lambda: F.linear(x, W, b),
    }
    if onednn_ok(device, dtype):
        fns["frozen_onednn"] = lambda: onednn_linear(x, W, b)
    fns["eager"] = lambda: _eager(x, W, b, A, B, s, p)
    if layer is not None:
        fns["peft"] = lambda: layer(x)
    if with_compile:
        comp = compiled(_eager, dynamic=True)  # one compile for every shape (~12 s), in warm-up
        fns["compile"] = lambda: comp(x, W, b, A, B, s, p)
    fns["fastpeft"] = lambda: fastpeft.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True)

    params = [x, A, B] + ([] if layer is None else list(layer.lora_A["default"].parameters())
                          + list(layer.lora_B["default"].parameters()))
    return autograd_preps(fns, mode, dy, params), tensors


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda":
        plan = [(s, m) for s in CUDA_SHAPES for m in MODES]
        budget, min_reps = 3.0, 5
    elif quick:
        plan = [(s, m) for s in QUICK_SHAPES for m in MODES]
        budget, min_reps = 0.3, 3
    else:
        plan = [(s, m) for s in CPU_SHAPES for m in MODES] + [(s, "full") for s in CPU_SWEEP]
        budget, min_reps = None, None
    out: List[Case] = []
    shared: Dict[tuple, dict] = {}
    for (M, K, N), mode in plan:
        provs, shared[(M, K, N)] = _providers(M, K, N, R, P, dtype, device, mode, shared.get((M, K, N)),
                                              with_compile=not quick)
        if budget is None:  # CPU defaults: the whole run fits in about 3 minutes on 2 cores
            b, mr = (9.0, 5) if mode == "full" else (4.0, 4)
            if M * K * N < 1e9:  # the sweep's small shapes
                b, mr = 3.0, 5
        else:
            b, mr = budget, min_reps
        out.append(Case(op="lora", mode=mode, shape=f"M={M} K={K} N={N} r={R} p={P}", dtype=dtype,
                        device=device, providers=provs, floor="frozen", ours="fastpeft",
                        min_reps=mr, budget_s=b))
    return out
