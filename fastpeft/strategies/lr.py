"""Learning rates: layer-wise LR decay, discriminative (named) LR groups, warmup + cosine.

:class:`WarmupCosine` multiplies each param group's *own* initial lr by the schedule factor,
so the per-group rates from :func:`layerwise_lr_groups` / :func:`discriminative_lr_groups`
keep their ratios throughout training.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from fastpeft.strategies._layers import param_layer_ids

__all__ = ["layerwise_lr_groups", "discriminative_lr_groups", "WarmupCosine", "NO_WEIGHT_DECAY"]

#: parameter names (last component) never weight-decayed besides 1-D tensors (biases, norms)
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")


def _no_decay(name: str, p: torch.Tensor, extra: Sequence[str]) -> bool:
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in extra


def layerwise_lr_groups(model: nn.Module, base_lr: float, decay: float = 0.75, weight_decay: float = 0.05,
                        no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY, blocks: Optional[str] = None,
                        ) -> List[dict]:
    """Optimizer param groups with layer-wise LR decay (BEiT / MAE fine-tuning recipe).

    With ``L`` blocks: embeddings (patch/pos/[CLS], BERT's ``embeddings``) get
    ``base_lr * decay**(L+1)``, block ``i`` gets ``base_lr * decay**(L-i)`` and the top (final
    norm, pooler, head) ``base_lr``. Biases, norm weights (every 1-D parameter) and the names in
    ``no_weight_decay`` get weight decay 0. Only trainable parameters are included.

    Each group is a dict ``{"params", "lr", "weight_decay", "lr_scale", "layer_id", "name"}``
    (torch optimizers keep the extra keys); groups are ordered by layer id.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay: expected a float in (0, 1], got {decay!r}")
    ids, num_layers = param_layer_ids(model, blocks)
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = ids[name]
        nd = _no_decay(name, p, no_weight_decay)
        key = (lid, nd)
        if key not in groups:
            scale = decay ** (num_layers + 1 - lid)
            groups[key] = {"params": [], "lr": base_lr * scale, "lr_scale": scale, "layer_id": lid,
                           "weight_decay": 0.0 if nd else weight_decay,
                           "name": f"layer_{lid}_{'no_decay' if nd else 'decay'}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def discriminative_lr_groups(model: nn.Module, lrs: Mapping[str, float], default_lr: Optional[float] = None,
                             weight_decay: float = 0.0,
                             no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY) -> List[dict]:
    """Param groups with a learning rate per named part of the model.

    ``lrs`` maps module paths (``"patch_embed"``, ``"blocks.11"``, ``"head"``,
    ``"bert.encoder.layer.0"``; ``""`` matches everything) to learning rates; each trainable
    parameter takes the rate of the longest path it lies under, else ``default_lr`` (a
    ValueError names the unmatched parameters when that is None). Groups:
    ``{"params", "lr", "weight_decay", "name"}`` with name = the matched path (or "default"),
    split into decay / no-decay (1-D parameters and ``no_weight_decay`` names).
    """
    keys = sorted(lrs, key=len, reverse=True)
    modules = dict(model.named_modules())
    for k in keys:
        if k and k not in modules and k not in dict(model.named_parameters()):
            raise ValueError(f"lrs: expected module paths of {type(model).__name__}, got unknown {k!r}")
    groups: Dict[tuple, dict] = {}
    unmatched = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), None)
        if match is None:
            if default_lr is None:
                unmatched.append(name)
                continue
            lr, gname = default_lr, "default"
        else:
            lr, gname = lrs[match], match
        nd = _no_decay(name, p, no_weight_decay)
        key = (gname, nd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr, "weight_decay": 0.0 if nd else weight_decay, "name": gname}
        groups[key]["params"].append(p)
    if unmatched:
        raise ValueError(f"lrs: expected every trainable parameter to match a path (or default_lr), "
                         f"got unmatched {unmatched[:5]}{' ...' if len(unmatched) > 5 else ''}")
    return list(groups.values())


class WarmupCosine(LRScheduler):
    """Linear warmup then cosine decay, per optimizer step; scales each group's initial lr.

    factor(t) = t / warmup_steps                              for t < warmup_steps
              = r + (1 - r) * (1 + cos(pi * s)) / 2           s = (t - warmup) / (total - warmup)
    with ``r = min_lr_ratio``; ``s`` is clipped to 1, so after ``total_steps`` the lr stays at
    ``r * initial_lr``. Equals ``transformers.get_cosine_schedule_with_warmup`` for r = 0.
    Call ``scheduler.step()`` after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected a non-negative int, got {warmup_steps!r}")
        if not isinstance(total_steps, int) or total_steps <= warmup_steps:
            raise ValueError(f"total_steps: expected an int > warmup_steps={warmup_steps}, got {total_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a float in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the initial lr at optimizer step ``step``."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        s = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * s))

    def get_lr(self) -> List[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]
