"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) for continual fine-tuning."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

__all__ = ["EWC"]


class EWC:
    """Diagonal-Fisher quadratic penalty that keeps parameters near an old task's optimum.

    At construction (call it with the model at the old optimum ``θ*``) the diagonal Fisher
    ``F`` of every trainable parameter is estimated from ``data``, then
    ``penalty(model) = lam / 2 * Σ F ⊙ (θ - θ*)²``: add it to the new task's loss.

    Args:
        model: the model at ``θ*``; its trainable parameters are the ones constrained.
        data: iterable of ``(inputs, targets)`` batches from the old task; ``inputs`` a tensor
            or a dict of keyword arguments.
        loss_fn: ``loss_fn(model(inputs), targets)``, a mean over the batch (e.g. cross-entropy).
        lam: the penalty strength λ.
        num_batches: use at most this many batches.

    ``F`` is the empirical Fisher averaged over batches, ``mean_b (∂loss_b/∂θ)²``; with batches
    of one sample this is the classic per-sample estimate, larger batches are cheaper and
    smoother. The model is evaluated in eval mode (no dropout) and its ``.grad`` fields are not
    touched.
    """

    def __init__(self, model: nn.Module, data: Iterable, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 lam: float = 1.0, num_batches: Optional[int] = None):
        self.lam = float(lam)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("model: expected trainable parameters to consolidate, got none")
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.star: Dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in zip(names, params)}
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = model.training
        model.eval()
        count = 0
        try:
            for batch in data:
                if num_batches is not None and count >= num_batches:
                    break
                x, y = batch[0], batch[1]
                out = model(**x) if isinstance(x, dict) else model(x)
                grads = torch.autograd.grad(loss_fn(out, y), params, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.add_(g.detach().float().square())
                count += 1
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("data: expected at least one batch, got none")
        self.fisher: Dict[str, torch.Tensor] = {n: f / count for n, f in zip(names, fisher)}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lam / 2 * Σ F ⊙ (θ - θ*)²`` over the consolidated parameters (a 0-dim tensor with grad)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.star if n not in params]
        if missing:
            raise ValueError(f"model: expected the parameters EWC was built on, missing {missing[:5]}")
        total = None
        for n, star in self.star.items():
            p = params[n]
            term = (self.fisher[n] * (p.float() - star.float()).square()).sum()
            total = term if total is None else total + term
        return 0.5 * self.lam * total
