"""Multi-task fine-tuning: one shared backbone, one head per task, a weighted multi-task loss.

:class:`MultiTaskHeads` runs the backbone once per batch and every task head on the pooled
features; :class:`MultiTaskLoss` sums the per-task losses with fixed weights, or learns them
(``weighting="uncertainty"``: homoscedastic uncertainty, Kendall et al. 2018:
``Σ exp(-s_t)·L_t + s_t`` with a learned ``s_t = log σ_t²`` per task).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.strategies.probing import pool_tokens, tokens_of

__all__ = ["MultiTaskHeads", "MultiTaskLoss"]


class MultiTaskHeads(nn.Module):
    """A shared backbone with one head per task.

    Args:
        backbone: returns tokens ``(B, T, D)`` (ViT ``forward_features``, HF ``last_hidden_state``,
            see :func:`fastpeft.strategies.probing.tokens_of`) or features ``(B, D)``; trained as
            configured (frozen, fully, or wrapped by ``get_peft_model``).
        heads: ``{task: module}``, or ``{task: num_classes}`` for a zero-initialised
            ``nn.Linear(dim, num_classes)``.
        dim: feature width for int heads (read from ``backbone.config`` when None).
        pool: ``"cls"``, ``"mean"`` or ``"last"`` (see :func:`pool_tokens`) for token outputs.
        features_fn: ``features_fn(backbone, *args, **kwargs) -> (B, D)`` to override all of this.

    ``forward(*args, task=None, **kwargs)``: ``{task: logits}`` for every task (backbone run
    once), or one task's logits when ``task`` is given.
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, Union[nn.Module, int]], dim: Optional[int] = None,
                 pool: str = "cls", features_fn: Optional[Callable[..., torch.Tensor]] = None):
        super().__init__()
        if not heads:
            raise ValueError("heads: expected at least one task, got none")
        self.backbone = backbone
        self.pool, self.features_fn = pool, features_fn
        ref = next(backbone.parameters(), None)
        built = {}
        for task, h in heads.items():
            if isinstance(h, int):
                if dim is None:
                    cfg = getattr(backbone, "config", None)
                    dim = getattr(cfg, "dim", None) or getattr(cfg, "hidden_size", None)
                    if dim is None:
                        raise ValueError("dim: cannot be read from backbone.config; pass dim=")
                lin = nn.Linear(dim, h, device=None if ref is None else ref.device)
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
                h = lin
            built[task] = h
        self.heads = nn.ModuleDict(built)

    @property
    def tasks(self):
        return list(self.heads.keys())

    def features(self, *args, **kwargs) -> torch.Tensor:
        if self.features_fn is not None:
            return self.features_fn(self.backbone, *args, **kwargs)
        out = tokens_of(self.backbone, *args, **kwargs)
        if out.dim() == 2:
            return out
        n = int(getattr(self.backbone, "num_prefix_tokens", 0)) if self.pool == "mean" else 0
        return pool_tokens(out, self.pool, n, kwargs.get("attention_mask"))

    def forward(self, *args, task: Optional[str] = None, **kwargs):
        f = self.features(*args, **kwargs)
        if task is not None:
            if task not in self.heads:
                raise ValueError(f"task: expected one of {self.tasks}, got {task!r}")
            return self.heads[task](f)
        return {t: h(f) for t, h in self.heads.items()}


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses.

    Args:
        weights: ``{task: weight}`` (fixed; missing tasks weigh 1.0).
        weighting: ``"fixed"`` or ``"uncertainty"`` (learned ``log σ²`` per task; the module
            then has parameters: give them to the optimizer).
        losses: ``{task: loss_fn(logits, target)}``; default cross-entropy.
        tasks: the task names (needed for ``"uncertainty"``).

    ``forward(outputs: {task: logits}, targets: {task: target}) -> total``; tasks without a
    target are skipped; ``last`` holds the unweighted per-task losses of the call.
    """

    def __init__(self, weights: Optional[Mapping[str, float]] = None, weighting: str = "fixed",
                 losses: Optional[Mapping[str, Callable]] = None, tasks=None):
        super().__init__()
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"weighting: expected 'fixed' or 'uncertainty', got {weighting!r}")
        self.weights = dict(weights or {})
        bad = {t: w for t, w in self.weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"weights: expected non-negative numbers, got {bad}")
        self.weighting, self.losses = weighting, dict(losses or {})
        if weighting == "uncertainty":
            tasks = list(tasks or self.weights)
            if not tasks:
                raise ValueError("tasks: expected the task names for weighting='uncertainty'")
            self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in tasks})
        self.last: Dict[str, torch.Tensor] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total, self.last = None, {}
        for task, y in targets.items():
            if task not in outputs:
                raise ValueError(f"targets: task {task!r} has no output (outputs: {list(outputs)})")
            loss = self.losses.get(task, F.cross_entropy)(outputs[task], y)
            self.last[task] = loss.detach()
            if self.weighting == "uncertainty":
                s = self.log_vars[task]
                term = torch.exp(-s) * loss + s
            else:
                term = self.weights.get(task, 1.0) * loss
            total = term if total is None else total + term
        if total is None:
            raise ValueError("targets: expected at least one task, got none")
        return total
