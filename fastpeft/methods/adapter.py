"""Bottleneck adapters (``peft_type`` "ADAPTER", fastpeft-only): Houlsby, Pfeiffer, AdaptFormer.

Transformer blocks come from the model-family table (:data:`fastpeft.families.BLOCKS`); a
sequential :class:`fastpeft.Adapter` wraps the attention / FFN output projection, a
:class:`fastpeft.ParallelAdapter` reads the block's residual stream beside the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from fastpeft import families
from fastpeft.config import _check, _Config
from fastpeft.methods.base import Journal, PeftMethod, first_param, get_module, parent_of, register_method
from fastpeft.modules.slots import (AdapterLayer, AdapterSlot, BertParallelOutput, CaptureInput, ParallelAdapterSlot,
                                    ParallelMLP)

__all__ = ["AdapterConfig", "AdapterMethod"]


@dataclass
class AdapterConfig(_Config):
    """Bottleneck adapters: ``kind`` "houlsby" (after attention and FFN outputs), "pfeiffer"
    (after the FFN output) or "parallel" / "adaptformer" (beside the MLP, reading the residual).

    bottleneck: m; or reduction_factor: m = hidden // reduction_factor (give one, not both;
        neither means 64). activation / scaling / dropout / init: see ``fastpeft.Adapter``;
        scaling None means the kind's default (1.0 sequential, 0.1 parallel).
    """
    peft_type = "ADAPTER"
    kind: str = "houlsby"
    bottleneck: Optional[int] = None
    reduction_factor: Optional[float] = None
    activation: str = "relu"
    scaling: Optional[float] = None
    dropout: float = 0.0
    init: str = "lora"
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        kinds = ("houlsby", "pfeiffer", "parallel", "adaptformer")
        _check(self.kind in kinds, f"kind: expected one of {kinds}, got {self.kind!r}")
        _check(self.bottleneck is None or self.reduction_factor is None,
               f"bottleneck / reduction_factor: give one, not both (got {self.bottleneck!r}, "
               f"{self.reduction_factor!r})")
        _check(self.bottleneck is None or (isinstance(self.bottleneck, int) and self.bottleneck >= 1),
               f"bottleneck: expected a positive int, got {self.bottleneck!r}")
        _check(self.reduction_factor is None or self.reduction_factor > 0,
               f"reduction_factor: expected > 0, got {self.reduction_factor!r}")
        _check(0.0 <= float(self.dropout) < 1.0, f"dropout: expected [0, 1), got {self.dropout!r}")

    def bottleneck_for(self, hidden: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        if self.reduction_factor is not None:
            return max(1, int(hidden // self.reduction_factor))
        return 64

    @property
    def placement(self) -> str:
        return "parallel" if self.kind == "adaptformer" else self.kind

    def module_scaling(self) -> float:
        if self.scaling is not None:
            return float(self.scaling)
        return 0.1 if self.placement == "parallel" else 1.0


def _parallel_site(model, site, journal: Journal) -> AdapterSlot:
    """The parallel-adapter slot of a block (created on first use)."""
    kind, *paths = site["parallel"]
    if kind == "slot":
        blk, attr = parent_of(model, paths[0])
        m = getattr(blk, attr)
        if not isinstance(m, ParallelAdapterSlot):
            if m is not None:
                raise ValueError(f"{paths[0]}: already holds a {type(m).__name__}")
            m = ParallelAdapterSlot()
            journal.set_module(blk, attr, m)
    elif kind == "bert_output":
        m = get_module(model, paths[0])
        if not isinstance(m, BertParallelOutput):
            m = BertParallelOutput(m)
            journal.replace(model, paths[0], m)
    else:  # prenorm: capture the norm's input, run the adapter beside the MLP
        norm_path, mlp_path = paths
        m = get_module(model, mlp_path)
        if not isinstance(m, ParallelMLP):
            m = ParallelMLP(m)
            journal.replace(model, mlp_path, m)
            journal.replace(model, norm_path, CaptureInput(get_module(model, norm_path), m))
    return m


@register_method
class AdapterMethod(PeftMethod):
    config_class = AdapterConfig
    supports_mixed_batch = True

    def inject(self, journal: Journal, loading: bool = False) -> None:
        from fastpeft.modules.adapter import ADAPTER_PLACEMENTS, Adapter, ParallelAdapter

        c, model, name = self.config, self.model, self.name
        sites = families.block_sites(model)
        if not sites:
            raise ValueError(f"AdapterConfig: found no transformer blocks in {type(model).__name__} (supported: "
                             f"{', '.join(b.name for b in families.BLOCKS)} blocks)")
        kw = dict(activation=c.activation, scaling=c.module_scaling(), dropout=c.dropout, init=c.init)
        for site in sites:
            for where in ADAPTER_PLACEMENTS[c.placement]:
                if where in ("attn_out", "ffn_out"):
                    m = get_module(model, site[where])
                    if not isinstance(m, AdapterLayer):
                        m = AdapterLayer(m)
                        journal.replace(model, site[where], m)
                    d, w = families.out_features(m.base_layer), first_param(m.base_layer)
                    ad = Adapter(d, c.bottleneck_for(d), device=w.device, dtype=w.dtype, **kw)
                else:
                    m = _parallel_site(model, site, journal)
                    d, w = site["dim"], first_param(model)
                    ad = ParallelAdapter(d, c.bottleneck_for(d), device=w.device, dtype=w.dtype, **kw)
                m.adapters[name] = ad
                journal.on_undo(lambda m=m: m.adapters.pop(name))

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for path, m in self.model.named_modules():
            if isinstance(m, AdapterSlot) and self.name in m.adapters:
                for pn, p in m.adapters[self.name].named_parameters():
                    out[f"base_model.model.{path}.adapters.{pn}"] = p
        return out
