"""LoRA on ``nn.Embedding`` and ``nn.Conv2d``, with HF PEFT's parameter layout and maths.

* :class:`LoRAEmbedding`: ``lora_embedding_A[name]`` ``(r, num_embeddings)`` and
  ``lora_embedding_B[name]`` ``(embedding_dim, r)`` (``nn.Parameter``\\ s, as PEFT);
  ``y = E[x] + s·(A^T[x])·B^T``. PEFT's init: A zeros, B normal(0, 1); no dropout on this
  branch (PEFT applies none either).
* :class:`LoRAConv2d`: ``lora_A[name] = Conv2d(in, r, kernel, stride, padding)`` and
  ``lora_B[name] = Conv2d(r, out, 1, groups=base.groups)``; ``y = conv(x) + s·B(A(drop(x)))``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.modules.lora import LoRALayer

__all__ = ["LoRAEmbedding", "LoRAConv2d"]


def _plain_init(init) -> None:
    if isinstance(init, str) and init.lower() != "gaussian":
        raise ValueError(f"init_lora_weights: {init!r} is only available for linear layers (PEFT: the same)")


class LoRAEmbedding(LoRALayer):
    def __init__(self, base_layer: nn.Embedding, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 adapter_name: str = "default", backend: Optional[str] = None):
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError(f"base_layer: expected nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer, adapter_name, backend)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def _factors(self):
        return self.lora_embedding_A, self.lora_embedding_B

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str] = True) -> None:
        _plain_init(init_lora_weights)
        if init_lora_weights is False:
            return  # randn factors, as PEFT
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name].float(), self.lora_embedding_B[adapter_name].float()
        return (B @ A).t() * self.scaling[adapter_name]

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].t(), padding_idx=b.padding_idx, max_norm=b.max_norm,
                              norm_type=b.norm_type, scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)
        out = (after_a @ self.lora_embedding_B[name].t()) * self.scaling[name]
        scale = getattr(b, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale the update too
        return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)


class LoRAConv2d(LoRALayer):
    def __init__(self, base_layer: nn.Conv2d, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 adapter_name: str = "default", backend: Optional[str] = None):
        if not isinstance(base_layer, nn.Conv2d):
            raise ValueError(f"base_layer: expected nn.Conv2d, got {type(base_layer).__name__}")
        if r % base_layer.groups:
            raise ValueError(f"r: expected a multiple of the conv's groups={base_layer.groups}, got {r}")
        super().__init__(base_layer, adapter_name, backend)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def _create(self, name: str, r: int) -> None:
        b = self.base_layer
        kw = dict(device=b.weight.device, dtype=b.weight.dtype, bias=False)
        # as PEFT: the base conv's kernel, stride and padding (not its dilation), then a 1x1 conv
        self.lora_A[name] = nn.Conv2d(self.in_features, r, b.kernel_size, b.stride, b.padding, **kw)
        self.lora_B[name] = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), groups=b.groups, **kw)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str] = True) -> None:
        _plain_init(init_lora_weights)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            return
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        nn.init.zeros_(B)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float()
        s = self.scaling[adapter_name]
        if self.base_layer.weight.shape[2:4] == (1, 1):
            return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
        out = F.conv2d(A.transpose(0, 1), B)
        return out * s if self.base_layer.groups > 1 else out.transpose(0, 1) * s

    def merge(self, adapter_names=None, safe_merge: bool = True) -> None:
        if self.base_layer.groups > 1:
            raise ValueError("merge: LoRA on a grouped Conv2d cannot be merged (PEFT: the same)")
        super().merge(adapter_names, safe_merge)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name]
        p = self.lora_dropout[name]
        h = x.to(A.weight.dtype)
        h = F.dropout(h, p, self.training) if p > 0 else h
        return self.lora_B[name](A(h)) * self.scaling[name]
