"""Hugging Face PEFT interoperability: ``patch_peft`` runs an existing ``peft`` LoRA model on
fastpeft's fused LoRA op.

Each ``peft.tuners.lora.Linear`` is switched in place to a subclass (``FusedLinear``, defined
in this module so patched models pickle and ``torch.save`` like unpatched ones) whose
``forward`` calls ``fastpeft.lora_linear`` (one fused base + LoRA op). The module object, its
parameters, adapter names, scaling, merge state and every PEFT method (``set_adapter``,
``disable_adapter``, ``merge_and_unload``, ``save_pretrained``) stay PEFT's.

Fused: ``nn.Linear`` and GPT-2 ``Conv1D`` base layers (the latter through a transposed weight
view), a LoRA bias (``lora_bias=True``: folded into the op's bias), several active adapters (the
first in the fused op, the others added), DoRA (``use_dora=True``, a single active adapter: on
``fastpeft.dora_linear``, PEFT's conventions). Not fused, and said so by :func:`patch_summary`
(logged when patching): other LoRA variants, DoRA with ``lora_bias``, other LoRA layer types
(Embedding, Conv), quantized layers; per call, a DoRA adapter active together with others. Per call, PEFT's own forward also runs for ``adapter_names`` mixed batches, merged or
disabled adapters and inputs whose dtype differs from the base weight's. Adapters that PEFT keeps
in fp32 on a bf16 / fp16 base are cast to the activation dtype for the fused op (it accumulates
in fp32); outputs then agree with PEFT to that dtype's tolerance.

Dropout: with ``lora_dropout > 0`` in training, fastpeft draws its own (counter-based) masks,
so individual masks differ from PEFT's torch RNG ones; in eval mode or with p = 0 outputs
and gradients are PEFT's.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.modules.lora import is_conv1d
from fastpeft.ops.dora import dora_linear
from fastpeft.ops.lora import lora_linear

__all__ = ["patch_peft", "unpatch_peft", "patch_summary", "PatchSummary", "FusedPeftLoraLinear"]

log = logging.getLogger("fastpeft")
_FUSED_CLASSES: Dict[type, type] = {}


def _is_dora(layer, name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(name, False))


def _vanilla(layer, name: str) -> Optional[str]:
    """Why adapter ``name`` of a PEFT LoRA layer cannot run in the fused op (None: it can).
    DoRA adapters run on ``fastpeft.dora_linear`` (PEFT's ``DoraLinearVariant`` only)."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if _is_dora(layer, name):
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"DoRA variant {type(variant).__name__}"
        if name not in getattr(layer, "lora_magnitude_vector", {}):
            return "DoRA without a magnitude vector"
        if layer.lora_B[name].bias is not None:
            return "DoRA with lora_bias"
    elif variant is not None:
        return f"LoRA variant {type(variant).__name__}"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None:
        return "lora_A / lora_B are not plain nn.Linear"
    if not A.weight.is_floating_point() or A.weight.dtype != B.weight.dtype:
        return "lora_A / lora_B dtypes differ"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _base_reason(layer) -> Optional[str]:
    base = layer.get_base_layer()
    if type(base) is nn.Linear:
        return "fan_in_fan_out on an nn.Linear" if getattr(layer, "fan_in_fan_out", False) else None
    if is_conv1d(base):
        return None
    return f"base layer {type(base).__name__}"


class FusedPeftLoraLinear:
    """Mixin put in front of PEFT's ``lora.Linear`` by :func:`patch_peft`."""

    _fastpeft_backend: Optional[str] = None

    def _fastpeft_plan(self, x: torch.Tensor, args, kwargs):
        """``-> (weight, bias, [(A, B, scaling, p)], extra)`` when the fused op computes exactly
        PEFT's forward, else None."""
        if args or kwargs or self.disable_adapters or self.merged or _base_reason(self) is not None:
            return None
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active or any(_vanilla(self, a) for a in active):
            return None
        if len(active) > 1 and any(_is_dora(self, a) for a in active):
            return None  # PEFT's DoRA then reuses the running sum of the other adapters: its own forward
        if x.dtype != base.weight.dtype:
            return None
        weight = base.weight.t() if is_conv1d(base) else base.weight
        bias, terms = base.bias, []
        for name in active:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if A.dtype != x.dtype:
                # PEFT keeps adapters in fp32 on a bf16/fp16 base (autocast_adapter_dtype): the fused op
                # runs in the activation dtype (fp32 accumulation); the casts are differentiable, so the
                # fp32 parameters still receive their gradients
                A, B = A.to(x.dtype), B.to(x.dtype)
            drop = self.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
            s = float(self.scaling[name])
            b = self.lora_B[name].bias
            if b is not None:  # lora_bias: s·(B A x + b) -> the op's bias gets s·b
                b = s * b.to(x.dtype)
                bias = b if bias is None else bias + b
            m = None
            if _is_dora(self, name):
                m = self.lora_magnitude_vector[name].weight
                m = m.to(x.dtype) if m.dtype != x.dtype else m
            terms.append((A, B, s, p, m))
        return weight, bias, terms

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self._fastpeft_plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        weight, bias, terms = plan
        A, B, s, p, m = terms[0]
        if m is not None:  # a single DoRA adapter (PEFT's conventions, see fastpeft.ops.dora)
            return dora_linear(x, weight, bias, A, B, m, s, p, training=p > 0.0, backend=self._fastpeft_backend)
        y = lora_linear(x, weight, bias, A, B, s, p, training=p > 0.0, backend=self._fastpeft_backend)
        for A, B, s, p, _ in terms[1:]:  # further active adapters add their updates (as PEFT)
            y = y + F.linear(F.linear(F.dropout(x, p, True) if p > 0 else x, A), B) * s
        return y


def _fused_class(cls: type) -> type:
    """``Fused<cls name>``, registered as a module attribute so pickle finds it by name."""
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        fused = type(name, (FusedPeftLoraLinear, cls), {"__module__": __name__, "__qualname__": name,
                                                       "_peft_class": cls})
        _FUSED_CLASSES[cls] = fused
        globals()[name] = fused
    return _FUSED_CLASSES[cls]


def __getattr__(name: str):
    """Unpickling a patched model in a fresh process: ``FusedLinear`` is made on first lookup."""
    if name.startswith("Fused") and name != "FusedPeftLoraLinear":
        try:
            from peft.tuners.lora import layer as peft_layer
        except ImportError:
            raise AttributeError(name) from None
        cls = getattr(peft_layer, name[len("Fused"):], None)
        if isinstance(cls, type):
            return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PatchSummary:
    """What :func:`patch_peft` fused: ``fused`` layers, and ``not_fused`` counts by reason."""
    fused: int = 0
    not_fused: Dict[str, int] = field(default_factory=dict)
    layers: Dict[str, str] = field(default_factory=dict)  # layer path -> "fused" or the reason

    def __str__(self) -> str:
        lines = [f"patch_peft: {self.fused} LoRA layer(s) on fastpeft's fused op, "
                 f"{sum(self.not_fused.values())} on PEFT's forward"]
        lines += [f"  not fused ({n}): {why}" for why, n in sorted(self.not_fused.items())]
        return "\n".join(lines)


def patch_summary(peft_model: nn.Module) -> PatchSummary:
    """Which LoRA layers of ``peft_model`` run fastpeft's fused op, and why the others do not
    (per-call fallbacks such as mixed batches or merged adapters are not counted)."""
    from peft.tuners.lora.layer import LoraLayer

    out = PatchSummary()
    why = Counter()
    for path, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if not isinstance(m, FusedPeftLoraLinear):
            reason = f"PEFT {type(m).__name__} layer (no fused op for it)"
        else:
            active = [a for a in m.active_adapters if a in m.lora_A]
            reason = _base_reason(m) or next((r for a in active for r in [_vanilla(m, a)] if r), None)
            if reason is None and len(active) > 1 and any(_is_dora(m, a) for a in active):
                reason = "DoRA active together with other adapters"
        out.layers[path] = reason or "fused"
        if reason:
            why[reason] += 1
        else:
            out.fused += 1
    out.not_fused = dict(why)
    return out


def patch_peft(peft_model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Switch every LoRA ``Linear`` of a ``peft`` model to fastpeft's fused op, in place.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module containing ``peft.tuners.lora.Linear``).
        backend: force a fastpeft backend for the patched layers (default: automatic).
    Returns:
        ``peft_model`` itself, with ``peft_model.fastpeft_patch_summary`` (a :class:`PatchSummary`,
        also logged: a warning when some layers stay on PEFT's forward). Raises ``ValueError``
        when it holds no PEFT LoRA Linear layer.
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
    summary = patch_summary(peft_model)
    object.__setattr__(peft_model, "fastpeft_patch_summary", summary)
    (log.warning if summary.not_fused else log.info)("%s", summary)
    return peft_model


def unpatch_peft(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`patch_peft` (layers go back to PEFT's own forward)."""
    for m in peft_model.modules():
        if isinstance(m, FusedPeftLoraLinear):
            m.__class__ = m._peft_class
            m.__dict__.pop("_fastpeft_backend", None)
    peft_model.__dict__.pop("fastpeft_patch_summary", None)
    return peft_model
