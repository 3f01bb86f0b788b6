"""Benchmark cases for many LoRA adapters in one batch: ``python -m fastpeft bench --op multi_lora``.

A batch of S samples (L tokens each; T = S·L rows of width K) through one frozen (N, K) linear
layer, each sample with its own LoRA adapter out of n (rank r), assigned ``uniform`` (round robin:
every adapter the same number of samples) or ``zipf`` (a few adapters take most samples, drawn
with P(a) ∝ 1/(a+1)^1.1 from a fixed seed, as popular / rare users are in serving).

Providers (the same x, W, b and adapters):

* ``frozen``   - ``F.linear(x, W, b)``: the floor, the layer without any adapter.
* ``single``   - ``fastpeft.lora_linear`` with ONE adapter for the whole batch: what a batch of one
  user costs with fastpeft (the acceptance reference for the training step).
* ``peft``     - HF PEFT's mixed batch: a ``PeftModel`` holding the n adapters, called with
  ``adapter_names=[...]`` (per sample). PEFT refuses ``adapter_names`` in training mode, so it is
  timed in ``fwd`` mode only (eval mode, as PEFT serves).
* ``loop``     - plain PyTorch as a user writes it: the frozen linear, then per adapter
  ``index_add`` of ``s·B(A(drop(x[rows])))`` on its rows (row indices precomputed, untimed).
* ``fastpeft`` - ``fastpeft.multi_lora_linear`` (the frozen GEMM once, the rank-r work segmented).

Modes: ``fwd`` (serving: eval mode, no dropout, the autograd graph recorded as in the other
benches) and ``full`` (a training step, forward + backward, dropout p = 0.1, gradients to x and
every adapter's A and B).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.bench import Case, autograd_preps

R, P, ALPHA = 16, 0.1, 32.0
CPU_PLAN = dict(samples=16, tokens=256, K=768, N=768, adapters=(1, 4, 8, 32))
CUDA_PLAN = dict(samples=64, tokens=512, K=4096, N=4096, adapters=(1, 4, 8, 32))
QUICK_PLAN = dict(samples=4, tokens=8, K=32, N=48, adapters=(3,))
ASSIGN = ("uniform", "zipf")
MODES = ("fwd", "full")
NOTES = ["`single`: one adapter for the whole batch (fastpeft.lora_linear); `peft`: HF PEFT's `adapter_names=` "
         "mixed batch (fwd only: PEFT refuses it in training mode); `loop`: eager loop over the adapters."]


def assignment(samples: int, n: int, kind: str) -> torch.Tensor:
    """Per-sample adapter ids (S,): round robin, or Zipf-skewed from a fixed seed."""
    if kind == "uniform":
        return torch.arange(samples) % n
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1
    return torch.multinomial(w, samples, replacement=True, generator=torch.Generator().manual_seed(0))


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_model(W, b, A, B, p: float):
    """HF PEFT model around an nn.Linear(W, b) holding the n adapters ("a0", ...); or None."""
    try:
        import peft
    except Exception:  # noqa: BLE001 - peft is an optional extra
        return None
    n, r, K = A.shape
    N = W.shape[0]
    lin = nn.Linear(K, N, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p, target_modules=["lin"])
    pm = peft.get_peft_model(_Holder(lin), cfg, adapter_name="a0")
    for a in range(1, n):
        pm.add_adapter(f"a{a}", cfg)
    layer = pm.base_model.model.lin
    with torch.no_grad():
        for a in range(n):
            layer.lora_A[f"a{a}"].weight.copy_(A[a])
            layer.lora_B[f"a{a}"].weight.copy_(B[a])
    return pm.to(device=W.device, dtype=W.dtype).eval()


def _providers(plan: dict, n: int, kind: str, mode: str, dtype, device) -> Dict[str, Callable]:
    import fastpeft

    S, L, K, N = plan["samples"], plan["tokens"], plan["K"], plan["N"]
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = mk(S, L, K).requires_grad_()
    W, b = mk(N, K, scale=K ** -0.5), mk(N)
    A = mk(n, R, K, scale=K ** -0.5).requires_grad_()
    B = mk(n, N, R, scale=R ** -0.5).requires_grad_()
    dy = mk(S, L, N)
    s = ALPHA / R
    train = mode == "full"
    p = P if train else 0.0
    sample_ids = assignment(S, n, kind)
    ids = sample_ids.to(device)
    token_ids = sample_ids.repeat_interleave(L).to(device)
    groups = [(a, (token_ids == a).nonzero().squeeze(1)) for a in range(n)]
    groups = [(a, rows) for a, rows in groups if rows.numel()]

    def loop():
        x2 = x.reshape(S * L, K)
        y = F.linear(x2, W, b)
        for a, rows in groups:
            xa = x2.index_select(0, rows)
            upd = s * F.linear(F.linear(F.dropout(xa, p, training=train), A[a]), B[a])
            y = y.index_add(0, rows, upd)
        return y.view(S, L, N)

    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "frozen": lambda: F.linear(x, W, b),
        "single": lambda: fastpeft.lora_linear(x, W, b, A[0], B[0], s, dropout_p=p, training=train),
    }
    params = [x, A, B]
    if mode == "fwd":
        pm = _peft_model(W, b, A.detach(), B.detach(), p)
        if pm is not None:
            names = [f"a{a}" for a in sample_ids.tolist()]
            fns["peft"] = lambda: pm(x, adapter_names=names)
            params += [q for q in pm.parameters() if q.requires_grad]
    fns["loop"] = loop
    fns["fastpeft"] = lambda: fastpeft.multi_lora_linear(x, W, b, A, B, s, ids, dropout_p=p, training=train)
    return autograd_preps(fns, mode, dy, params)


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    plan = QUICK_PLAN if quick else (CUDA_PLAN if device.type == "cuda" else CPU_PLAN)
    out: List[Case] = []
    for n in plan["adapters"]:
        for kind in ASSIGN:
            if n == 1 and kind == "zipf":
                continue  # one adapter: nothing to skew
            for mode in MODES:
                S, L = plan["samples"], plan["tokens"]
                shape = (f"T={S * L} ({S}x{L}) K={plan['K']} N={plan['N']} r={R} n={n} {kind}"
                         + (f" p={P}" if mode == "full" else ""))
                budget, reps = (0.3, 3) if quick else ((3.0, 5) if device.type == "cpu" else (2.0, 5))
                out.append(Case(op="multi_lora", mode=mode, shape=shape, dtype=dtype, device=device,
                                providers=_providers(plan, n, kind, mode, dtype, device), floor="frozen",
                                ours="fastpeft", min_reps=reps, budget_s=budget))
    return out
