"""Hugging Face PEFT interoperability: ``patch_peft`` runs an existing ``peft`` LoRA model on
fastpeft's fused LoRA op.

Each ``peft.tuners.lora.Linear`` is switched in place to :class:`FusedPeftLoraLinear`, a
subclass whose ``forward`` calls ``fastpeft.lora_linear`` (one fused base + LoRA op). The
module object, its parameters, adapter names, scaling, merge state and every PEFT method
(``set_adapter``, ``disable_adapter``, ``merge_and_unload``, ``save_pretrained``) stay PEFT's,
so nothing else in the PEFT model changes. Cases the fused op does not cover (DoRA and other
LoRA variants, several active adapters at once, ``adapter_names`` mixed batches,
``fan_in_fan_out`` weights, a LoRA bias, a base layer that is not ``nn.Linear``, an input whose
dtype differs from the base weight's) fall back to PEFT's own forward for that call. Adapters
that PEFT keeps in fp32 on a bf16 / fp16 base are cast to the activation dtype for the fused op
(it accumulates in fp32); outputs then agree with PEFT to that dtype's tolerance.

Dropout: with ``lora_dropout > 0`` in training, fastpeft draws its own (counter-based) masks,
so individual masks differ from PEFT's torch RNG ones; in eval mode or with p = 0 outputs
and gradients are PEFT's.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from fastpeft.ops.lora import lora_linear

__all__ = ["patch_peft", "unpatch_peft", "FusedPeftLoraLinear"]

_FUSED_CLASSES: Dict[type, type] = {}


class FusedPeftLoraLinear:
    """Mixin put in front of PEFT's ``lora.Linear`` by :func:`patch_peft`."""

    _fastpeft_backend: Optional[str] = None

    def _fastpeft_plan(self, x: torch.Tensor, args, kwargs):
        """``-> (A, B, scaling, p)`` when the fused op computes exactly PEFT's forward, else None."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        base = self.get_base_layer()
        if type(base) is not nn.Linear or getattr(self, "fan_in_fan_out", False):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False):
            return None
        if getattr(self, "lora_bias", {}).get(name, False):
            return None
        A, B = self.lora_A[name], self.lora_B[name]
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
            return None
        drop = self.lora_dropout[name]
        if isinstance(drop, nn.Dropout):
            p = float(drop.p) if drop.training else 0.0
        elif isinstance(drop, nn.Identity):
            p = 0.0
        else:
            return None
        if x.dtype != base.weight.dtype or A.weight.dtype != B.weight.dtype or not A.weight.is_floating_point():
            return None
        a, b = A.weight, B.weight
        if a.dtype != x.dtype:
            # PEFT keeps adapters in fp32 on a bf16/fp16 base (autocast_adapter_dtype): the fused op
            # runs in the activation dtype (fp32 accumulation); the casts are differentiable, so the
            # fp32 parameters still receive their gradients
            a, b = a.to(x.dtype), b.to(x.dtype)
        return a, b, float(self.scaling[name]), p

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self._fastpeft_plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        A, B, s, p = plan
        base = self.get_base_layer()
        return lora_linear(x, base.weight, base.bias, A, B, s, p, training=p > 0.0,
                           backend=self._fastpeft_backend)


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedPeftLoraLinear, cls),
                                   {"__module__": __name__, "_peft_class": cls})
    return _FUSED_CLASSES[cls]


def patch_peft(peft_model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Switch every LoRA ``Linear`` of a ``peft`` model to fastpeft's fused op, in place.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module containing ``peft.tuners.lora.Linear``).
        backend: force a fastpeft backend for the patched layers (default: automatic).
    Returns:
        ``peft_model`` itself. Raises ``ValueError`` when it holds no PEFT LoRA Linear layer.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    n = 0
    for m in peft_model.modules():
        cls = type(m)
        if isinstance(m, FusedPeftLoraLinear):
            m._fastpeft_backend = backend
            n += 1
        elif cls is PeftLoraLinear:  # exact class: quantized / other subclasses keep their own forward
            m.__class__ = _fused_class(cls)
            m._fastpeft_backend = backend
            n += 1
    if n == 0:
        raise ValueError(f"peft_model: found no peft.tuners.lora.Linear layer in {type(peft_model).__name__}")
    return peft_model


def unpatch_peft(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`patch_peft` (layers go back to PEFT's own forward)."""
    for m in peft_model.modules():
        if isinstance(m, FusedPeftLoraLinear):
            m.__class__ = m._peft_class
            m.__dict__.pop("_fastpeft_backend", None)
    return peft_model
