"""``MultiLoRALinear``: a frozen linear layer with n stacked LoRA adapters, each row of the input
choosing its own (``adapter_ids``), fused by :func:`fastpeft.multi_lora_linear`.

For serving or training many users / tasks over one shared frozen layer in one batch. (Inside
a ``PeftModel``, ``LoRALinear`` layers run PEFT's ``adapter_names=[...]`` through the same op.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fastpeft.ops.multi_lora import multi_lora_linear

__all__ = ["MultiLoRALinear"]


class MultiLoRALinear(nn.Module):
    """``y[i] = base(x[i]) + s·B[a](A[a](drop(x[i])))`` with ``a = adapter_ids[i]`` (-1: base only).

    Args:
        base_layer: the ``nn.Linear`` (in_features K, out_features N) shared by every adapter (frozen).
        num_adapters: n; r: rank of every adapter (smaller ranks: zero-pad, see
            :func:`fastpeft.stack_lora_weights`); lora_alpha: ``s = alpha / r``.
        lora_dropout: dropout on the LoRA branch input during training.
        backend: force a backend (default: automatic).
    Parameters:
        lora_A (n, r, K): kaiming-uniform like ``nn.Linear``; lora_B (n, N, r): zeros (each adapter
        starts as the identity update, as LoRA).
    """

    def __init__(self, base_layer: nn.Linear, num_adapters: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: expected nn.Linear, got {type(base_layer).__name__}")
        for name, v in (("num_adapters", num_adapters), ("r", r)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.scaling, self.lora_dropout, self.backend = r, lora_alpha / r, float(lora_dropout), backend
        w = base_layer.weight
        K, N = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.empty(num_adapters, r, K, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, N, r, device=w.device, dtype=w.dtype))
        for a in range(num_adapters):
            nn.init.kaiming_uniform_(self.lora_A.data[a], a=math.sqrt(5))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """x (..., K); adapter_ids int64 of shape x.shape[:-1] (per token) or (x.shape[0],) (per sample)."""
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                 self.scaling, adapter_ids, self.lora_dropout, training=self.training,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        n, r, K = self.lora_A.shape
        return f"num_adapters={n}, r={r}, in_features={K}, out_features={self.lora_B.shape[1]}, scaling={self.scaling}"
