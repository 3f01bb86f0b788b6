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
from fastpeft.methods.base import Journal, PeftMethod, register_method

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
        names = families.bias_names(self.model)
        if not names:
            raise ValueError(f"BitFitConfig: {type(self.model).__name__} has no bias parameters")
        params = dict(self.model.named_parameters())
        self.names: List[str] = names
        self.original: Dict[str, torch.Tensor] = {}
        for pn in names:
            journal.requires_grad(params[pn], True)
            self.original[pn] = params[pn].detach().clone()

    def tensors(self) -> Dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {"base_model.model." + pn: params[pn] for pn in self.names}

    def merge(self) -> None:
        pass

    def delete(self) -> None:
        raise ValueError("delete_adapter: BitFit trains biases in place and cannot be deleted")

    @contextlib.contextmanager
    def disabled(self):
        params = dict(self.model.named_parameters())
        saved = {pn: params[pn].detach().clone() for pn in self.original}
        with torch.no_grad():
            for pn, v in self.original.items():
                params[pn].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for pn, v in saved.items():
                    params[pn].copy_(v)
