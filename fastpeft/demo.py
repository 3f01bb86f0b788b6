"""``python -m fastpeft demo``: every fine-tuning method on a real dataset, on the CPU.

Data: scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download).
1. Pretrain a tiny ViT on digits 0-4 at 8×8.
2. Fine-tune it on the held-out digits 5-9 at 16×16 (a higher resolution: the position
   embeddings are interpolated in 2-D) with every method: full fine-tuning, full with
   layer-wise LR decay, linear probing on cached features, partial-k, an MLP-k head,
   BitFit, LoRA, Houlsby / Pfeiffer / AdaptFormer adapters, VPT shallow and deep; multi-task
   (one LoRA backbone, a digit head and a parity head, weighted multi-task loss); few-shot
   (5-way 5-shot episodes on the novel digits, LoRA trained with the prototypical loss,
   scored on episodes drawn from the test split).
3. Print (and plot) per method: trainable parameters, test accuracy, training-step time
   with fastpeft's fused backend vs the reference backend, and peak memory of a step.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


def _progress(it, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, **kw)
    except ImportError:  # tqdm is optional
        return it


def load_digits_split(seed: int = 0):
    """(pretrain_x, pretrain_y, ft_train_x, ft_train_y, ft_test_x, ft_test_y), images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    pre = torch.isin(y, torch.tensor(PRETRAIN_CLASSES))
    px, py = x[pre], y[pre]
    fx, fy = x[~pre], y[~pre] - len(PRETRAIN_CLASSES)
    perm = torch.randperm(len(fx), generator=g)
    n_test = len(fx) // 4
    te, tr = perm[:n_test], perm[n_test:]
    return px, py, fx[tr], fy[tr], fx[te], fy[te]


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def batches(x, y, bs, g):
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), bs):
        idx = perm[i:i + bs]
        yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, x, y, bs: int = 256) -> float:
    model.eval()
    correct = sum((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs))
    return correct / len(x)


def train(model, params_or_groups, x, y, epochs, lr, bs, seed, desc, forward=None):
    from fastpeft.strategies import WarmupCosine

    forward = forward or model
    opt = torch.optim.AdamW(params_or_groups, lr=lr, weight_decay=0.01)
    steps = epochs * ((len(x) + bs - 1) // bs)
    sched = WarmupCosine(opt, warmup_steps=max(1, steps // 10), total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in _progress(range(epochs), desc=desc, leave=False):
        for xb, yb in batches(x, y, bs, g):
            loss = F.cross_entropy(forward(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


@dataclass
class Method:
    name: str
    build: Callable  # (pretrained ViT) -> (model to train, params or param groups, lr)
    fused: bool      # does a fastpeft fused op run in its training step?


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _methods(num_classes: int) -> List[Method]:
    from fastpeft import AdapterConfig, BitFitConfig, LoraConfig, VPTConfig, get_peft_model
    from fastpeft import strategies as S

    def full(m):
        S.replace_head(m, num_classes)
        S.full_finetune(m)
        return m, _trainable(m), 1e-3

    def full_llrd(m):
        S.replace_head(m, num_classes)
        S.full_finetune(m)
        return m, S.layerwise_lr_groups(m, base_lr=2e-3, decay=0.75), 2e-3

    def partial(m):
        S.replace_head(m, num_classes)
        S.partial_k(m, 2)
        return m, _trainable(m), 2e-3

    def mlp_head(m):
        S.freeze(m)
        m.head = S.MLPHead(m.config.dim, num_classes, k=3, hidden=128)
        return m, _trainable(m), 3e-3

    def bitfit(m):
        S.replace_head(m, num_classes)
        pm = get_peft_model(m, BitFitConfig(modules_to_save=["head"]))
        return pm, _trainable(pm), 5e-3

    def peft(cfg_fn, lr):
        def build(m):
            S.replace_head(m, num_classes)
            pm = get_peft_model(m, cfg_fn())
            return pm, _trainable(pm), lr
        return build

    return [
        Method("full fine-tuning", full, False),
        Method("full + layer-wise LR decay", full_llrd, False),
        Method("partial-k (k=2)", partial, False),
        Method("MLP-3 head", mlp_head, False),
        Method("BitFit", bitfit, False),
        Method("LoRA r=8 (qkv, attn.proj)", peft(lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                              target_modules=["qkv", "attn.proj"],
                                                              modules_to_save=["head"]), 3e-3), True),
        Method("Adapter Houlsby m=16", peft(lambda: AdapterConfig(kind="houlsby", bottleneck=16,
                                                                  activation="gelu",
                                                                  modules_to_save=["head"]), 3e-3), True),
        Method("Adapter Pfeiffer m=16", peft(lambda: AdapterConfig(kind="pfeiffer", bottleneck=16,
                                                                   activation="gelu",
                                                                   modules_to_save=["head"]), 3e-3), True),
        Method("AdaptFormer m=16", peft(lambda: AdapterConfig(kind="parallel", bottleneck=16, scaling=0.1,
                                                              modules_to_save=["head"]), 3e-3), True),
        Method("VPT shallow (10 prompts)", peft(lambda: VPTConfig(num_prompts=10, deep=False,
                                                                  modules_to_save=["head"]), 5e-3), True),
        Method("VPT deep (10 prompts)", peft(lambda: VPTConfig(num_prompts=10, deep=True,
                                                               modules_to_save=["head"]), 5e-3), True),
    ]


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def step_times_ms(model, params, x, y, backends, reps: int, loss_fn: Callable = _ce) -> List[float]:
    """Median training-step time (fwd + bwd of ``loss_fn(model, x, y)``) for each entry of
    ``backends`` (None: automatic, else a FASTPEFT_BACKEND value), measured interleaved so load
    affects them alike."""
    old = os.environ.get("FASTPEFT_BACKEND")
    times = [[] for _ in backends]
    model.train()
    try:
        for rep in range(reps + 2):  # the first two rounds warm up
            for i, backend in enumerate(backends):
                if backend:
                    os.environ["FASTPEFT_BACKEND"] = backend
                else:
                    os.environ.pop("FASTPEFT_BACKEND", None)
                t0 = time.perf_counter()
                loss_fn(model, x, y).backward()
                if rep >= 2:
                    times[i].append((time.perf_counter() - t0) * 1e3)
                for p in params:
                    p.grad = None
    finally:
        if old is None:
            os.environ.pop("FASTPEFT_BACKEND", None)
        else:
            os.environ["FASTPEFT_BACKEND"] = old
    return [sorted(t)[len(t) // 2] for t in times]


def run(epochs_pre: int = 25, epochs_ft: int = 15, size_ft: int = 16, bs: int = 64, seed: int = 0,
        reps: int = 10, plot_path: Optional[str] = "bench_out/demo.png", quick: bool = False,
        markdown_path: Optional[str] = None) -> List[dict]:
    from fastpeft.bench import peak_memory_mb
    from fastpeft.models import ViT, ViTConfig
    from fastpeft.models.pos_embed import resize_pos_embed
    from fastpeft.strategies import FeatureCache, LinearProbe

    if quick:
        epochs_pre, epochs_ft, reps = 2, 1, min(reps, 2)
    torch.manual_seed(seed)
    px, py, fx, fy, tx, ty = load_digits_split(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, in_chans=1, dim=64, depth=4, heads=4, mlp_dim=128,
                    num_classes=len(PRETRAIN_CLASSES), pool="cls")
    base = ViT(cfg)
    print(f"pretraining a tiny ViT ({sum(p.numel() for p in base.parameters()):,} params) on digits "
          f"{PRETRAIN_CLASSES} at 8x8 ...")
    train(base, base.parameters(), px, py, epochs_pre, 3e-3, bs, seed, "pretrain")
    print(f"pretrain accuracy (train set): {accuracy(base, px, py):.3f}")
    resize_pos_embed(base, size_ft)  # 8x8 -> 16x16 images: 4x4 -> 8x8 patch grid, bicubic
    fx_hi, tx_hi = upsample(fx, size_ft), upsample(tx, size_ft)
    xb, yb = fx_hi[:bs], fy[:bs]
    results = []

    def record(name, model, params, acc, fused, loss_fn=_ce):
        n_train = sum(p.numel() for p in params)
        if fused:
            fast, ref = step_times_ms(model, params, xb, yb, [None, "reference"], reps, loss_fn)
        else:  # no fused op in this method's step: both backends run the same code
            fast = ref = step_times_ms(model, params, xb, yb, [None], reps, loss_fn)[0]
        model.train()

        def prep():
            def step():
                loss_fn(model, xb, yb).backward()
            return step

        peak = peak_memory_mb(prep, torch.device("cpu"))
        for p in params:
            p.grad = None
        results.append(dict(method=name, trainable=n_train, accuracy=acc, step_ms=fast, ref_step_ms=ref,
                            peak_mb=peak))
        print(f"  {name:<28} trainable {n_train:>9,}  acc {acc:.3f}  step {fast:6.1f} ms "
              f"(reference {ref:6.1f} ms)  peak {peak:6.1f} MB", flush=True)

    print(f"fine-tuning on digits {FINETUNE_CLASSES} at {size_ft}x{size_ft} "
          f"({len(fx)} train / {len(tx)} test images):")
    # Linear probing: run the frozen backbone once, train the head on cached features.
    m = copy.deepcopy(base)
    probe = LinearProbe(m, len(FINETUNE_CLASSES), pool="cls")
    cache = FeatureCache(probe, fx_hi, fy, batch_size=256)
    head_params = list(probe.head.parameters())
    opt = torch.optim.AdamW(head_params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs_ft * 4):
        for f_b, y_b in batches(cache.features, cache.labels, bs, g):
            loss = F.cross_entropy(probe.head(f_b), y_b)
            opt.zero_grad()
            loss.backward()
            opt.step()
    record("linear probe (cached CLS)", probe, head_params, accuracy(probe, tx_hi, ty), False)

    for meth in _methods(len(FINETUNE_CLASSES)):
        model, params, lr = meth.build(copy.deepcopy(base))
        train(model, params, fx_hi, fy, epochs_ft, lr, bs, seed, meth.name)
        flat = [p for grp in params for p in grp["params"]] if params and isinstance(params[0], dict) else params
        record(meth.name, model, flat, accuracy(model, tx_hi, ty), meth.fused)
    _multitask(base, fx_hi, fy, tx_hi, ty, epochs_ft, bs, seed, record)
    _fewshot(base, fx_hi, fy, tx_hi, ty, 6 if quick else 120, 4 if quick else 100, seed, record)
    print()
    table = format_results(results)
    print(table)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as f:
            f.write(f"Tiny ViT (dim 64, depth 4) pretrained on digits {PRETRAIN_CLASSES} at 8x8, fine-tuned on "
                    f"{FINETUNE_CLASSES} at {size_ft}x{size_ft} for {epochs_ft} epochs; CPU, "
                    f"{torch.get_num_threads()} threads, batch {bs}. Step time: median of {reps} training steps "
                    f"with the automatic backend vs FASTPEFT_BACKEND=reference.\n\n{table}\n")
    if plot_path:
        path = plot_results(results, plot_path)
        if path:
            print(f"plot: {path}")
    return results


def _lora_backbone(base):
    from fastpeft import LoraConfig, get_peft_model
    from fastpeft import strategies as S
    m = copy.deepcopy(base)
    m.head = nn.Identity()  # the task heads live outside the backbone
    S.freeze(m)
    return get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "attn.proj"]))


def _multitask(base, fx, fy, tx, ty, epochs, bs, seed, record):
    """One LoRA backbone, two heads (the digit, and its parity) and a weighted multi-task loss."""
    from fastpeft import strategies as S

    pm = _lora_backbone(base)
    model = S.MultiTaskHeads(pm, {"digit": len(FINETUNE_CLASSES), "parity": 2}, dim=base.config.dim,
                             features_fn=lambda b, x: b.model.pool(b.model.forward_features(x)))
    mtl = S.MultiTaskLoss({"digit": 1.0, "parity": 0.5})

    def loss_fn(m, x, y):
        return mtl(m(x), {"digit": y, "parity": (y + FINETUNE_CLASSES[0]) % 2})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in _progress(range(epochs), desc="multi-task", leave=False):
        for xb, yb in batches(fx, fy, bs, g):
            loss = loss_fn(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(tx)
    acc = (out["digit"].argmax(-1) == ty).float().mean().item()
    par = (out["parity"].argmax(-1) == (ty + FINETUNE_CLASSES[0]) % 2).float().mean().item()
    print(f"  multi-task: digit accuracy {acc:.3f}, parity accuracy {par:.3f}")
    record("multi-task LoRA (digit + parity heads)", model, params, acc, True, loss_fn)


def _fewshot(base, fx, fy, tx, ty, train_episodes, test_episodes, seed, record,
             n_way: int = 5, k_shot: int = 5, n_query: int = 10):
    """N-way K-shot episodes on the novel digits: prototypes from the support set, the query
    scored by distance; LoRA fine-tuned with the prototypical loss on training-split episodes."""
    from fastpeft import strategies as S

    pm = _lora_backbone(base)

    def feats(x):
        return pm.model.pool(pm.model.forward_features(x))

    def episode_acc(episodes, g):
        pm.eval()
        accs = []
        with torch.no_grad():
            for _ in range(episodes):
                ep = S.sample_episode(ty, n_way, k_shot, n_query, generator=g)
                head = S.PrototypicalHead().fit(feats(tx[ep.support]), ep.support_labels, n_way)
                accs.append((head(feats(tx[ep.query])).argmax(-1) == ep.query_labels).float().mean().item())
        return sum(accs) / len(accs)

    with pm.disable_adapter():
        frozen = episode_acc(test_episodes, torch.Generator().manual_seed(seed + 1))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    pm.train()
    for _ in _progress(range(train_episodes), desc="few-shot", leave=False):
        ep = S.sample_episode(fy, n_way, k_shot, n_query, generator=g)
        loss = S.prototypical_loss(feats(fx[ep.query]), ep.query_labels, feats(fx[ep.support]), ep.support_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = episode_acc(test_episodes, torch.Generator().manual_seed(seed + 1))
    print(f"  few-shot {n_way}-way {k_shot}-shot on test episodes: frozen backbone prototypes {frozen:.3f}, "
          f"after episodic LoRA training {acc:.3f}")
    fixed = S.sample_episode(fy, n_way, k_shot, n_query, generator=torch.Generator().manual_seed(seed))

    def loss_fn(m, x, y):  # one training episode per step
        return S.prototypical_loss(feats(fx[fixed.query]), fixed.query_labels, feats(fx[fixed.support]),
                                   fixed.support_labels)
    record(f"ProtoNet LoRA ({n_way}-way {k_shot}-shot)", pm, params, acc, True, loss_fn)


def format_results(results: List[dict]) -> str:
    out = ["| method | trainable params | test accuracy | step ms (fastpeft) | step ms (reference) | peak MB |",
           "|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['method']} | {r['trainable']:,} | {r['accuracy']:.3f} | {r['step_ms']:.1f} | "
                   f"{r['ref_step_ms']:.1f} | {r['peak_mb']:.1f} |")
    return "\n".join(out)


def plot_results(results: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].barh(names, [r["accuracy"] for r in results])
    axes[0].set_xlabel("test accuracy")
    axes[1].barh(names, [r["trainable"] for r in results])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters")
    axes[2].barh([n + " (ref)" for n in names], [r["ref_step_ms"] for r in results], color="gray")
    axes[2].barh(names, [r["step_ms"] for r in results])
    axes[2].set_xlabel("training step ms")
    for ax in axes[1:]:
        ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpeft demo")
    p.add_argument("--epochs-pretrain", type=int, default=25)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--size", type=int, default=16, help="fine-tuning resolution (pretraining is 8)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--plot", default="bench_out/demo.png")
    p.add_argument("--markdown", default="bench_out/demo.md", help="table for scripts/update_readme.py")
    a = p.parse_args(argv)
    run(a.epochs_pretrain, a.epochs, a.size, quick=a.quick, plot_path=a.plot or None,
        markdown_path=a.markdown or None)
    return 0
