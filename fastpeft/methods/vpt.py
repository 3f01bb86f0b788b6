"""Visual prompt tuning (``peft_type`` "VPT", fastpeft-only, Jia et al.): ``num_prompts`` learned
tokens after [CLS] (after the position embeddings); ``deep`` replaces them before every block.

fastpeft's ViT runs :class:`fastpeft.VPT` (deep VPT as fused attention prefixes); an HF ViT gets
the prompts from forward hooks on its embeddings (and, deep, on its blocks). Its classifier reads
[CLS], so the prompt tokens never reach the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from fastpeft import families
from fastpeft.config import _check, _Config
from fastpeft.methods import _prompting as feed
from fastpeft.methods.base import Journal, PeftMethod, first_param, register_method

__all__ = ["VPTConfig", "VPTMethod", "VisualPrompts"]


@dataclass
class VPTConfig(_Config):
    """Visual prompt tuning for ViTs (fastpeft's and Hugging Face's): ``num_prompts`` learned
    tokens after [CLS]; ``deep`` re-initialises them before every block (VPT-deep)."""
    peft_type = "VPT"
    num_prompts: int = 10
    deep: bool = False
    dropout: float = 0.0
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        _check(isinstance(self.num_prompts, int) and self.num_prompts >= 1,
               f"num_prompts: expected a positive int, got {self.num_prompts!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


class VisualPrompts(nn.Module):
    """``prompt_embeddings`` ``(depth if deep else 1, P, D)``, VPT's uniform init."""

    def __init__(self, n_sets: int, num_prompts: int, dim: int, bound: float, device=None, dtype=None):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.empty(n_sets, num_prompts, dim, device=device, dtype=dtype))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)


@register_method
class VPTMethod(PeftMethod):
    config_class = VPTConfig

    def inject(self, journal: Journal, loading: bool = False) -> None:
        from fastpeft.modules.vpt import VPT, vpt_init_bound

        c, model = self.config, self.model
        self.family = families.family_of(model)
        self.feed = feed.Feed()
        if self.family.vpt == "native":
            n_prefix = model.num_prefix_tokens
            journal.on_undo(lambda: setattr(model, "num_prefix_tokens", n_prefix))
            enc = VPT(model, c.num_prompts, deep=c.deep, dropout=c.dropout, train_head=False)
            # the ViT lives in base_model.model: keep a plain reference so it is not registered twice
            enc._modules.pop("vit")
            object.__setattr__(enc, "vit", model)
            model.num_prefix_tokens = n_prefix  # VPT raises it only while its prompts are in the sequence
        elif self.family.vpt == "hooks":
            hc = model.config
            n_sets = hc.num_hidden_layers if c.deep else 1
            w = first_param(model)
            bound = vpt_init_bound(hc.patch_size, hc.hidden_size, getattr(hc, "num_channels", 3))
            enc = VisualPrompts(n_sets, c.num_prompts, hc.hidden_size, bound, device=w.device, dtype=w.dtype)
            feed.install_vpt_hooks(model, self.family, self.feed, c.deep, journal)
        else:
            raise ValueError(f"VPTConfig: needs a ViT (fastpeft.models.ViT or a Hugging Face ViT), got "
                             f"{type(model).__name__}")
        self.pm.prompt_encoder[self.name] = enc
        journal.on_undo(lambda: self.pm.prompt_encoder.pop(self.name))

    @property
    def encoder(self):
        return self.pm.prompt_encoder[self.name]

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.encoder.prompt_embeddings}

    def delete(self) -> None:
        feed.uninstall(self.model, self.feed)
        self.pm.prompt_encoder.pop(self.name)

    def wrap_forward(self, call, args, kwargs):
        model, enc = self.model, self.encoder
        if self.family.vpt == "native":
            images = args[0] if args else next(iter(kwargs.values()))
            old = model.num_prefix_tokens
            model.num_prefix_tokens = enc.num_prefix_tokens
            try:
                return enc(images)
            finally:
                model.num_prefix_tokens = old
        kw = feed.bind(model, args, kwargs)
        pixels = kw["pixel_values"]
        self.feed.value = feed.vpt_prompts(enc.prompt_embeddings, pixels.shape[0], self.config.dropout, self.pm.training)
        try:
            return call(**kw)
        finally:
            self.feed.value = None

