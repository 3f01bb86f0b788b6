"""Benchmark cases for prefix attention: ``python -m fastpeft bench --op prefix``.

Providers (attention over ``[prefix ; main]`` keys/values; q, k, v and both prefixes require grad):

* ``cat_sdpa``  - the floor, what a user writes: ``torch.cat`` of the batch-expanded prefix and the
  main K/V, then ``F.scaled_dot_product_attention`` (with the combined mask when causal).
* ``reference`` - fastpeft's reference backend (explicit two-source scores merged by one
  log-sum-exp, plain PyTorch); CPU only (at the CUDA shape its score matrices take ~15 GB).
* ``compile``   - ``torch.compile`` of ``cat_sdpa`` (compiled once, dynamic shapes, in the
  untimed warm-up; left out with ``quick``).
* ``fastpeft``  - ``fastpeft.prefix_attention`` on the automatic backend (C++ on CPU, Triton on CUDA).

Modes: ``fwd`` (forward with the autograd graph recorded), ``bwd`` (backward only; the forward runs
untimed in prep), ``full`` (forward + backward). Gradients are reset to None before every repetition.

Shapes: CPU fp32 ViT-B/16-like ``B=16 H=12 L=S=197 P=50 D=64``, Bp = 1 (shared prefix) and Bp = B;
CUDA bf16 ``B=8 H=32 L=S=2048 P=64 D=128`` causal, Bp = 1 and Bp = B.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fastpeft.bench import Case, autograd_preps, compiled

CPU_SHAPE = dict(B=16, H=12, L=197, S=197, P=50, D=64, causal=False)
CUDA_SHAPE = dict(B=8, H=32, L=2048, S=2048, P=64, D=128, causal=True)
QUICK_SHAPE = dict(B=2, H=4, L=33, S=33, P=5, D=16, causal=True)
MODES = ("fwd", "bwd", "full")


def cat_sdpa(q, k, v, prefix_k, prefix_v, is_causal: bool = False):
    """What a user writes: concatenate the (expanded) prefix with the main K/V and call SDPA."""
    B, H, L, _ = q.shape
    S, P = k.shape[2], prefix_k.shape[2]
    kk = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
    vv = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
    mask = None
    if is_causal:  # prefix columns visible, main part causal (top-left)
        mask = torch.ones(L, P + S, dtype=torch.bool, device=q.device).tril(diagonal=P)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def _tensors(B, H, L, S, P, D, Bp, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(q=mk(B, H, L, D).requires_grad_(), k=mk(B, H, S, D).requires_grad_(),
                v=mk(B, H, S, D).requires_grad_(), pk=mk(Bp, H, P, D).requires_grad_(),
                pv=mk(Bp, H, P, D).requires_grad_(), dout=mk(B, H, L, D))


def _providers(t: dict, causal: bool, mode: str, device: torch.device, with_compile: bool,
               with_reference: bool) -> Dict[str, Callable]:
    import fastpeft

    q, k, v, pk, pv, dout = t["q"], t["k"], t["v"], t["pk"], t["pv"], t["dout"]
    fns: Dict[str, Callable[[], torch.Tensor]] = {"cat_sdpa": lambda: cat_sdpa(q, k, v, pk, pv, causal)}
    if with_reference:
        fns["reference"] = lambda: fastpeft.prefix_attention(q, k, v, pk, pv, is_causal=causal,
                                                             backend="reference")
    if with_compile:
        comp = compiled(cat_sdpa, dynamic=True)
        fns["compile"] = lambda: comp(q, k, v, pk, pv, causal)
    fns["fastpeft"] = lambda: fastpeft.prefix_attention(q, k, v, pk, pv, is_causal=causal)
    return autograd_preps(fns, mode, dout, (q, k, v, pk, pv))


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda":
        shape, budget, min_reps = CUDA_SHAPE, 3.0, 5
    elif quick:
        shape, budget, min_reps = QUICK_SHAPE, 0.3, 3
    else:  # the whole CPU run (2 Bp x 3 modes, compile included) takes about 2 minutes on 2 cores
        shape, budget, min_reps = CPU_SHAPE, 3.0, 5
    B, H, L, S, P, D, causal = (shape[n] for n in ("B", "H", "L", "S", "P", "D", "causal"))
    out: List[Case] = []
    for Bp in (1, B):
        t = _tensors(B, H, L, S, P, D, Bp, dtype, device)
        for mode in MODES:
            provs = _providers(t, causal, mode, device, with_compile=not quick,
                               with_reference=device.type == "cpu")
            desc = (f"B={B} H={H} L={L} S={S} P={P} D={D} Bp={Bp}" + (" causal" if causal else "")
                    + f" tokens={B * L}")
            out.append(Case(op="prefix", mode=mode, shape=desc, dtype=dtype, device=device, providers=provs,
                            floor="cat_sdpa", ours="fastpeft", min_reps=min_reps,
                            budget_s=budget * (1.5 if mode == "full" else 1.0)))
    return out

