"""Classification heads: replace a model's head, and MLP-k heads."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastpeft.strategies._layers import find_head

__all__ = ["replace_head", "MLPHead"]


def _in_features(head: nn.Module) -> Optional[int]:
    if isinstance(head, nn.Linear):
        return head.in_features
    if isinstance(head, MLPHead):
        return head.dim
    for m in head.modules():  # first linear layer of a composite head
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def replace_head(model: nn.Module, num_classes: int, *, in_features: Optional[int] = None,
                 attr: Optional[str] = None) -> nn.Linear:
    """Swap the model's output head for a zero-initialised ``nn.Linear(in_features, num_classes)``.

    Zero weight and bias make the new head output 0 (uniform softmax) until trained, so the
    first steps do not push random gradients into the backbone. The head keeps the old one's
    device and dtype and is trainable. ``in_features`` is read from the old head (a Linear or
    the first Linear inside it) unless given; ``attr`` is the head's path (found by name:
    ``head``/``classifier``/``fc``/``lm_head`` by default). ``model.config.num_classes`` /
    ``num_labels`` and ``model.num_labels`` are updated where present.

    Returns the new head.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    parent, leaf, old = find_head(model, attr)
    if in_features is None:
        in_features = _in_features(old)
        if in_features is None:
            raise ValueError(f"in_features: cannot be read from the current head ({type(old).__name__}); "
                             f"pass in_features=")
    ref = next(old.parameters(), None)
    if ref is None:  # e.g. nn.Identity: follow the rest of the model
        ref = next(model.parameters(), None)
    kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
    head = nn.Linear(in_features, num_classes, **kw)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    setattr(parent, leaf, head)
    cfg = getattr(model, "config", None)
    for field in ("num_classes", "num_labels"):
        if cfg is not None and hasattr(cfg, field):
            try:
                setattr(cfg, field, num_classes)
            except (AttributeError, TypeError):  # frozen configs: leave them
                pass
    if hasattr(model, "num_labels"):
        model.num_labels = num_classes
    return head


class MLPHead(nn.Module):
    """An MLP-k head: ``k`` linear layers, ``k - 1`` hidden ones of width ``hidden`` with GELU.

    ``MLPHead(dim, num_classes, k=1)`` is a linear head. Input ``(..., dim)`` -> ``(..., num_classes)``.
    ``layers`` is an ``nn.Sequential``; its last Linear is zero-initialised when ``zero_init``.
    """

    def __init__(self, dim: int, num_classes: int, k: int = 2, hidden: Optional[int] = None,
                 dropout: float = 0.0, zero_init: bool = False):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int (number of linear layers), got {k!r}")
        hidden = dim if hidden is None else hidden
        self.dim, self.num_classes, self.k, self.hidden = dim, num_classes, k, hidden
        layers = []
        width = dim
        for _ in range(k - 1):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        if zero_init:
            with torch.no_grad():
                layers[-1].weight.zero_()
                layers[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
