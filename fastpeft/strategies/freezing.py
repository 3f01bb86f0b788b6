"""Which parameters train: full fine-tuning, partial-k, BitFit, freezing helpers and
ULMFiT-style progressive unfreezing.

All of these only set ``requires_grad``. Build the optimizer over ``model.parameters()`` once:
parameters whose gradient stays ``None`` are skipped by torch optimizers, so unfreezing later
needs no new optimizer (with AdamW, a parameter's moments start when it first gets a gradient).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch
from torch import nn

from fastpeft.families import bias_names, under
from fastpeft.strategies._layers import find_head, param_layer_ids

__all__ = ["freeze", "unfreeze", "freeze_blocks", "full_finetune", "partial_k", "bitfit",
           "ProgressiveUnfreezer", "num_trainable"]

Frozen = Union[nn.Module, torch.Tensor, Iterable]


def _params(objs) -> Iterable[torch.Tensor]:
    for o in objs:
        if isinstance(o, nn.Module):
            yield from o.parameters()
        elif isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, Iterable):
            yield from _params(o)
        else:
            raise ValueError(f"freeze/unfreeze: expected modules, parameters or iterables of them, "
                             f"got {type(o).__name__}")


def freeze(*objs: Frozen) -> None:
    """``requires_grad = False`` on every parameter of the given modules / parameters."""
    for p in _params(objs):
        p.requires_grad_(False)


def unfreeze(*objs: Frozen) -> None:
    """``requires_grad = True`` on every parameter of the given modules / parameters."""
    for p in _params(objs):
        p.requires_grad_(True)


def num_trainable(model: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def full_finetune(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trainable. Returns the model."""
    unfreeze(model)
    return model


def freeze_blocks(model: nn.Module, upto: int, blocks: Optional[str] = None) -> nn.Module:
    """Freeze the embeddings and blocks ``0 .. upto-1`` (the bottom of the network).

    Other parameters are left as they are. ``upto`` in ``0..L``; 0 freezes only the embeddings.
    Returns the model.
    """
    ids, num_layers = param_layer_ids(model, blocks)
    if not isinstance(upto, int) or not 0 <= upto <= num_layers:
        raise ValueError(f"upto: expected an int in [0, {num_layers}], got {upto!r}")
    for name, p in model.named_parameters():
        if ids[name] <= upto:  # embeddings are layer 0, block i is layer i+1
            p.requires_grad_(False)
    return model


def partial_k(model: nn.Module, k: int, blocks: Optional[str] = None) -> nn.Module:
    """Partial-k fine-tuning: only the last ``k`` blocks, the final norm and the head train.

    ("Everything above the blocks" = final norm, pooler, head.) ``k = 0`` trains just the top,
    ``k = L`` everything but the embeddings. Returns the model.
    """
    ids, num_layers = param_layer_ids(model, blocks)
    if not isinstance(k, int) or not 0 <= k <= num_layers:
        raise ValueError(f"k: expected an int in [0, {num_layers}], got {k!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(ids[name] > num_layers - k)
    return model


def bitfit(model: nn.Module, train_head: bool = True, head: Optional[str] = None) -> nn.Module:
    """BitFit: only bias terms train (every ``*.bias``, LayerNorm β included).

    The biases are :func:`fastpeft.families.bias_names` (the rule ``BitFitConfig`` uses too). The
    output head (found as in :func:`fastpeft.strategies.replace_head`, or named by ``head``) is
    fully trainable when ``train_head``, and fully frozen otherwise, so that the bias count of
    the backbone matches the paper (ViT-B/16: 102,912). Returns the model.
    """
    head_path = None
    try:
        parent, leaf, _ = find_head(model, head)
    except ValueError:
        if head is not None:
            raise
    else:
        head_path = next(n for n, m in model.named_modules() if m is getattr(parent, leaf))
    heads = [head_path] if head_path is not None else []
    biases = set(bias_names(model, heads))
    for name, p in model.named_parameters():
        p.requires_grad_(train_head if under(name, heads) else name in biases)
    return model


class ProgressiveUnfreezer:
    """ULMFiT's gradual unfreezing: start with only the top (final norm + head) trainable and
    unfreeze one more group of ``blocks_per_step`` blocks from the top at each :meth:`step`
    (call it once per epoch); after the lowest block, the embeddings.

    Groups, top first: ``[top], [block L-1 .. L-blocks_per_step], ..., [embeddings]``.
    Construction freezes the whole model and unfreezes the first group.
    """

    def __init__(self, model: nn.Module, blocks_per_step: int = 1, blocks: Optional[str] = None):
        if not isinstance(blocks_per_step, int) or blocks_per_step < 1:
            raise ValueError(f"blocks_per_step: expected a positive int, got {blocks_per_step!r}")
        self.model = model
        ids, num_layers = param_layer_ids(model, blocks)
        self.num_layers = num_layers
        # layer ids, top to bottom: L+1 (top), L .. 1 (blocks, in chunks), 0 (embeddings)
        block_ids = list(range(num_layers, 0, -1))
        self.groups: List[List[int]] = [[num_layers + 1]]
        self.groups += [block_ids[i:i + blocks_per_step] for i in range(0, num_layers, blocks_per_step)]
        self.groups.append([0])
        self._by_id = {}
        for name, p in model.named_parameters():
            self._by_id.setdefault(ids[name], []).append(p)
        self.num_unfrozen = 0  # groups unfrozen so far
        freeze(model)
        self.step()

    @property
    def done(self) -> bool:
        """True once every group is trainable."""
        return self.num_unfrozen >= len(self.groups)

    def step(self) -> List[int]:
        """Unfreeze the next group; returns its layer ids (empty once everything is unfrozen)."""
        if self.done:
            return []
        group = self.groups[self.num_unfrozen]
        for lid in group:
            unfreeze(self._by_id.get(lid, []))
        self.num_unfrozen += 1
        return group

    def state_dict(self) -> dict:
        return {"num_unfrozen": self.num_unfrozen}

    def load_state_dict(self, state: dict) -> None:
        """Re-applies the freezing for ``state['num_unfrozen']`` groups."""
        freeze(self.model)
        self.num_unfrozen = 0
        for _ in range(int(state["num_unfrozen"])):
            self.step()
