"""Where a parameter sits in a transformer's depth: embeddings, block i, or the top (norm/head).

Layer-wise LR decay, partial-k and progressive unfreezing all need the same map, computed here
once for any model whose blocks live in one ``nn.ModuleList`` (fastpeft's ViT and BERT, HF
BERT/ViT/LLaMA, timm ViTs, and those wrapped by a PEFT model):

* layer id ``0``: embeddings (any parameter outside the blocks whose name has a component
  containing "embed", or a ``cls_token`` / ``dist_token`` / ``reg_token`` / ``mask_token``),
* layer id ``i + 1``: block ``i`` (``0 <= i < L``),
* layer id ``L + 1``: everything else: final norm, pooler, head, prompt parameters.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from fastpeft.families import HEAD_NAMES

__all__ = ["find_blocks", "param_layer_ids", "find_head"]

_TOKEN_PARAMS = {"cls_token", "dist_token", "reg_token", "mask_token"}


def find_blocks(model: nn.Module, blocks: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """The transformer blocks: ``(path, ModuleList)``.

    ``blocks`` names the ModuleList's path explicitly (e.g. ``"encoder.layer"``); by default it
    is the ModuleList holding the most parameters (the block stack in every transformer).
    """
    if blocks is not None:
        mod = model.get_submodule(blocks)
        if not isinstance(mod, nn.ModuleList):
            raise ValueError(f"blocks: expected the path of an nn.ModuleList, got {blocks!r} "
                             f"({type(mod).__name__})")
        return blocks, mod
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ValueError(f"model: expected an nn.ModuleList of transformer blocks in "
                         f"{type(model).__name__}, found none (pass blocks='path.to.blocks')")
    return best


def _is_embedding(name: str) -> bool:
    if "prompt" in name.lower():  # prompt/prefix parameters train at the full rate
        return False
    parts = name.split(".")
    return any("embed" in p.lower() or p in _TOKEN_PARAMS for p in parts)


def param_layer_ids(model: nn.Module, blocks: Optional[str] = None) -> Tuple[Dict[str, int], int]:
    """``({parameter name: layer id}, L)`` for every parameter (trainable or not); see the module doc."""
    path, stack = find_blocks(model, blocks)
    prefix = path + "." if path else ""
    num_layers = len(stack)
    ids: Dict[str, int] = {}
    for name, _ in model.named_parameters():
        if prefix and name.startswith(prefix):
            ids[name] = int(name[len(prefix):].split(".", 1)[0]) + 1
        elif _is_embedding(name):
            ids[name] = 0
        else:
            ids[name] = num_layers + 1
    return ids, num_layers


def find_head(model: nn.Module, attr: Optional[str] = None) -> Tuple[nn.Module, str, nn.Module]:
    """The output head: ``(parent module, attribute name, head module)``.

    ``attr`` is the head's path (e.g. ``"head"``, ``"classifier"``); by default the outermost
    module named one of :data:`fastpeft.families.HEAD_NAMES` (``head``, ``lm_head``,
    ``classifier``, ``score``, ``fc``: the same list the model-level API uses).
    """
    if attr is None:
        for name, _ in model.named_modules():
            if name and name.rsplit(".", 1)[-1] in HEAD_NAMES:
                attr = name
                break
        else:
            raise ValueError(f"model: expected an output head named one of {HEAD_NAMES} in "
                             f"{type(model).__name__}, found none (pass attr='path.to.head')")
    parent_path, _, leaf = attr.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not hasattr(parent, leaf):
        raise ValueError(f"attr: expected a submodule path of {type(model).__name__}, got {attr!r}")
    return parent, leaf, getattr(parent, leaf)
