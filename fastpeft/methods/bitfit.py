"""BitFit (``peft_type`` "BITFIT", fastpeft-only): train only the biases, in place.

The biases are :func:`fastpeft.families.bias_names` (the same rule as
``fastpeft.strategies.bitfit``). Their pre-training values are kept, so ``disable_adapter()``
shows the base model. BitFit changes the shared biases, so a model holds one BitFit adapter, it
is always applied (whichever adapters are active) and it cannot run in a mixed-adapter batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from fastpeft import families
from fastpeft.config import _Config
from fastpeft.methods.base import Journal, PeftMethod, own_parameters, register_method

__all__ = ["BitFitConfig", "BitFitMethod"]


@dataclass
class BitFitConfig(_Config):
    """BitFit (Ben Zaken et al.): train only the biases (LayerNorm's β included), base weights
    frozen. The output head's bias is left out (count it in with ``modules_to_save``)."""
    peft_type = "BITFIT"
    modules_to_save: Optional[List[str]] = None


@register_method
class BitFitMethod(PeftMethod):
    config_class = BitFitConfig
    mergeable = True  # the biases are the model's own: nothing to fold

    def inject(self, journal: Journal, loading: bool = False) -> None:
        if any(isinstance(m, BitFitMethod) for m in self.pm._methods.values()):
            raise ValueError("BitFitConfig: a model holds one BitFit adapter (biases are trained in place)")
        own = own_parameters(self.model)  # not the biases of adapters other methods added
        names = [n for n in families.bias_names(self.model) if n in own]
        if not names:
            raise ValueError(f"BitFitConfig: {type(self.model).__name__} has no bias parameters")
        # the Parameters themselves: their names change when other methods wrap their modules
        self.params: List[torch.nn.Parameter] = [own[pn] for pn in names]
        self.original: List[torch.Tensor] = [p.detach().clone() for p in self.params]
        for p in self.params:
            journal.requires_grad(p, True)

    def tensors(self) -> Dict[str, torch.Tensor]:
        ids = {id(p) for p in self.params}
        return {"base_model.model." + pn: p for pn, p in self.model.named_parameters() if id(p) in ids}

    def merge(self) -> None:
        pass

    def delete(self) -> None:
        raise ValueError("delete_adapter: BitFit trains biases in place and cannot be deleted")

    @contextlib.contextmanager
    def disabled(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, self.original):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)
