"""VPT-deep training step: fast prefix-attention path vs token concatenation.

``python -m fastpeft bench --op vpt``. One case (mode ``full``: forward, loss, backward) on a
ViT-B/16-sized encoder with random weights (4 blocks, width 768, 12 heads, MLP 3072, 224² images
-> 197 tokens, batch 16, 50 deep prompts per block, 10-class head). Providers:

* ``frozen``   (floor): the same frozen ViT without prompts; the embedded tokens require grad, so
  backward runs through every block as VPT's must (prompt gradients flow back to block 0).
* ``concat``:  ``VPT(deep=True, fast=False)``: prompts concatenated as tokens (the reference).
* ``fastpeft``: ``VPT(deep=True, fast=True)``: prompts as per-block K/V prefixes computed once per
  step (Bp = 1), through ``fastpeft.prefix_attention``.

The concat and fastpeft steps are checked against each other on every run (same loss to 1e-5,
same prompt gradients); the check raises on a mismatch and prints the figures once.
Acceptance (CPU, 2 threads, fp32): fastpeft >= 1.2x faster than concat.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn.functional as F

from fastpeft.bench import Case

LOSS_TOL = 1e-5
#: (loss |diff|, prompt-grad max |diff| relative to max |g|) the two paths must agree to, by dtype:
#: fp32 tight; in 16-bit (the CUDA run is bf16) the paths round differently through every block
TOLS = {torch.float32: (LOSS_TOL, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (3e-2, 1e-1)}


#: Lines the bench CLI adds under this op's table (the correctness check of the run).
NOTES: List[str] = []

def _shape(quick: bool) -> dict:
    if quick:
        return dict(image=64, patch=16, dim=192, heads=3, mlp=768, depth=2, batch=4, prompts=8)
    return dict(image=224, patch=16, dim=768, heads=12, mlp=3072, depth=4, batch=16, prompts=50)


def cases(device, dtype, quick: bool = False) -> List[Case]:
    from fastpeft.models import ViT, ViTConfig
    from fastpeft.modules.vpt import VPT

    device = torch.device(device)
    s = _shape(quick)
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=s["image"], patch_size=s["patch"], dim=s["dim"], depth=s["depth"],
                    heads=s["heads"], mlp_dim=s["mlp"], num_classes=10)
    vit = ViT(cfg).to(device=device, dtype=dtype)
    concat = VPT(vit, s["prompts"], deep=True, fast=False)
    fast = copy.deepcopy(concat)
    fast.fast = True
    floor_vit = copy.deepcopy(vit)
    floor_vit.requires_grad_(False)
    floor_vit.head.requires_grad_(True)
    images = torch.randn(s["batch"], 3, s["image"], s["image"], device=device, dtype=dtype)
    labels = torch.randint(0, 10, (s["batch"],), device=device)
    tokens = (s["image"] // s["patch"]) ** 2 + 1

    def zero(m):
        for p in m.parameters():
            p.grad = None

    def step_vpt(m):
        zero(m)
        loss = F.cross_entropy(m(images), labels)
        loss.backward()
        return loss

    def step_floor():
        zero(floor_vit)
        x = floor_vit.embed(images).requires_grad_()  # backward through every block, as VPT needs
        for blk in floor_vit.blocks:
            x = blk(x)
        loss = F.cross_entropy(floor_vit.forward_head(floor_vit.norm(x)), labels)
        loss.backward()
        return loss

    last: Dict[str, tuple] = {}
    printed = []

    def check(name, loss, m):
        # compare with the other path's latest step: same loss to 1e-5 and same prompt gradients
        last[name] = (loss.item(), m.prompt_embeddings.grad.detach().clone())
        if len(last) < 2:
            return
        (lc, gc), (lf, gf) = last["concat"], last["fastpeft"]
        gerr = (gf - gc).abs().max().item()
        gmag = max(gc.abs().max().item(), 1e-30)
        loss_tol, grad_tol = TOLS.get(dtype, TOLS[torch.float32])
        if abs(lf - lc) > loss_tol or gerr > grad_tol * gmag:
            raise AssertionError(f"vpt bench: fast path disagrees with concat: loss {lf!r} vs {lc!r} "
                                 f"(|diff| {abs(lf - lc):.2e}), prompt grad max |diff| {gerr:.2e} (max |g| {gmag:.2e})")
        if not printed:
            printed.append(True)
            msg = (f"vpt check: loss concat {lc:.8f} fastpeft {lf:.8f} |diff| {abs(lf - lc):.1e} "
                   f"(<= {loss_tol:g}); prompt-grad max |diff| {gerr:.1e} of max |g| {gmag:.1e}")
            NOTES.append(msg)
            print(msg, flush=True)

    def prep_concat():
        return lambda: check("concat", step_vpt(concat), concat)

    def prep_fast():
        return lambda: check("fastpeft", step_vpt(fast), fast)

    def prep_floor():
        return step_floor

    shape = (f"B={s['batch']} T={tokens} D={s['dim']} H={s['heads']} mlp={s['mlp']} depth={s['depth']} "
             f"prompts={s['prompts']}")
    # one step at full size takes seconds on 2 CPU threads: few repetitions keep the run short
    case = Case(op="vpt_deep_train_step", mode="full", shape=shape, dtype=dtype, device=device,
                providers={"frozen": prep_floor, "concat": prep_concat, "fastpeft": prep_fast},
                floor="frozen", min_reps=3 if device.type == "cpu" and not quick else 10,
                budget_s=2.0 if device.type == "cpu" and not quick else 6.0)
    return [case]
