"""``LoRALinear``: a frozen ``nn.Linear`` plus one or more LoRA adapters.

The layout mirrors HF PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``,
``lora_B[name]`` as bias-free ``nn.Linear``), so PEFT checkpoints map onto it key for key.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from fastpeft.ops.lora import lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + s·B(A(drop(x)))`` with the fused op; ``merge()`` folds it into base.

    Args:
        base_layer: the ``nn.Linear`` to adapt (frozen here).
        r: rank; lora_alpha: scale numerator (``s = alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the LoRA branch input during training.
        init_lora_weights: True (A kaiming-uniform a=sqrt(5), B zeros), "gaussian"
            (A normal(0, 1/r), B zeros) or False (B random too: for tests only).
        adapter_name: name of this first adapter (PEFT's "default").
        backend: force a backend for this layer (default: automatic).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 adapter_name: str = "default", backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_dropout: Dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: List[str] = []
        self._fixups: Dict[str, tuple] = {}
        self.disable_adapters = False
        self.backend = backend
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    # ---- adapters -------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: Union[bool, str] = True) -> None:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")
        w = self.base_layer.weight
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str] = True) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        else:
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(B)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(self.lora_A)}")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            d.pop(adapter_name, None)

    # ---- conveniences mirroring nn.Linear -----------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ---- merge ----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` in float32, shape (out_features, in_features)."""
        A = self.lora_A[adapter_name].weight.float()
        B = self.lora_B[adapter_name].weight.float()
        return (B @ A) * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = True) -> None:
        """Fold adapters into the base weight: computed in fp32, cast once.

        Elements whose round trip through the weight's dtype would not come back exactly are
        recorded (a sparse fix-up, usually a small fraction), so ``unmerge`` restores the
        base weight bit for bit however many times the two alternate.
        """
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        W = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                continue
            if name not in self.lora_A:
                raise ValueError(f"adapter_names: {name!r} not in {list(self.lora_A)}")
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"merge: adapter {name!r} has a non-finite (NaN/inf) delta weight; "
                                 "refusing to corrupt the base weight")
            merged = (W.float() + delta).to(W.dtype)
            back = (merged.float() - delta).to(W.dtype)
            bad = (back != W).view(-1).nonzero().squeeze(1)
            self._fixups[name] = (bad, W.view(-1)[bad].clone())
            W.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the exact base weight."""
        W = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            W.copy_((W.float() - self.get_delta_weight(name)).to(W.dtype))
            idx, vals = self._fixups.pop(name)
            W.view(-1)[idx] = vals

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.disable_adapters or self.merged or name not in self.lora_A:
            if self.disable_adapters and self.merged:
                raise RuntimeError("adapters are merged: unmerge() before disabling them")
            return self.base_layer(x)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                           self.lora_B[name].weight, self.scaling[name], self.lora_dropout[name],
                           training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, scaling={self.scaling}, merged={self.merged_adapters}")
