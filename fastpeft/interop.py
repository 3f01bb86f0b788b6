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
(Embedding, Conv), quantized layers; per call, a DoRA adapter active together with others.
Per call, PEFT's own forward also runs for merged or disabled adapters and inputs whose dtype
differs from the base weight's. Adapters that PEFT keeps
in fp32 on a bf16 / fp16 base are cast to the activation dtype for the fused op (it accumulates
in fp32); outputs then agree with PEFT to that dtype's tolerance.

Mixed batches (PEFT's ``adapter_names=[...]``, one adapter name per sample, ``"__base__"`` for
none): PEFT routes them to ``_mixed_batch_forward``, which the patched layers override with one
``fastpeft.multi_lora_linear`` call (the frozen GEMM once for the batch, the rank-r work grouped
by adapter). The adapters the batch names and the layer holds are stacked on every call
(``stack_lora_weights``: zero-padded to the largest rank, per-adapter scalings; no cache, so
weight updates, ``load_adapter`` and ``delete_adapter`` never leave stale stacks, and each
adapter's gradient flows back to its own ``lora_A`` / ``lora_B``); ``"__base__"`` rows and
adapters this layer does not hold get id -1 (base layer only), as in PEFT; a LoRA bias is added
to its adapter's rows. PEFT's errors (names / rows count, merged adapters, DoRA) are PEFT's.
Where the op cannot compute PEFT's result, the layer runs PEFT's own loop and warns once per
reason, naming it: adapters of the batch with different dropout rates in training (the op takes
one rate per call), LoRA variants / non-Linear factors, unsupported base layers, extra forward
arguments, an input dtype other than the base weight's outside autocast.

Dropout: with ``lora_dropout > 0`` in training, fastpeft draws its own (counter-based) masks,
so individual masks differ from PEFT's torch RNG ones; in eval mode or with p = 0 outputs
and gradients are PEFT's.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.modules.lora import is_conv1d
from fastpeft.ops.dora import dora_linear
from fastpeft.ops._common import autocast_dtype
from fastpeft.ops.lora import lora_linear
from fastpeft._warn import warn_once
from fastpeft.ops.multi_lora import multi_lora_linear, stack_lora_weights

__all__ = ["patch_peft", "unpatch_peft", "patch_summary", "PatchSummary", "FusedPeftLoraLinear"]

log = logging.getLogger("fastpeft")
_FUSED_CLASSES: Dict[type, type] = {}


def _warn_mixed_fallback(reason: str) -> None:
    warn_once("patch_peft", reason, f"patch_peft: an adapter_names= mixed batch runs PEFT's per-adapter loop, "
              f"not fastpeft.multi_lora_linear: {reason}", stacklevel=5)


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

    def _fastpeft_mixed_plan(self, x: torch.Tensor, args, kwargs, names):
        """``-> (used adapter names, dropout p)`` when ``multi_lora_linear`` computes PEFT's mixed
        batch exactly, else the reason it cannot (a str)."""
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if args or extra:
            return f"extra forward arguments ({len(args)} positional, keywords {extra})"
        why = _base_reason(self)
        if why is not None:
            return why
        if x.dim() < 2:
            return f"input of {x.dim()} dimension(s) (multi_lora_linear needs (batch, ..., features))"
        wanted = set(names)
        used = [a for a in self.lora_A if a in wanted]
        for a in used:
            why = _vanilla(self, a)
            if why is not None:
                return f"adapter {a!r}: {why}"
        w = self.get_base_layer().weight
        if x.dtype != w.dtype and autocast_dtype(x.device) is None:
            return f"input dtype {x.dtype} differs from the base weight's {w.dtype}"
        ps = {}
        for a in used:
            drop = self.lora_dropout[a]
            ps[a] = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        if len(set(ps.values())) > 1:
            return (f"adapters with different lora_dropout in training {ps} (multi_lora_linear takes one "
                    f"dropout rate per call)")
        return used, max(ps.values(), default=0.0)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names, **kwargs: Any) -> torch.Tensor:
        """PEFT's mixed batch (``adapter_names``: one name per sample) in one ``multi_lora_linear``
        call; PEFT's loop, with a one-time warning naming why, where the op cannot do it."""
        names = list(adapter_names)
        plan = self._fastpeft_mixed_plan(x, args, kwargs, names)
        if isinstance(plan, str):
            _warn_mixed_fallback(plan)
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        used, p = plan
        base = self.get_base_layer()
        if not used:  # only "__base__" rows or adapters this layer does not hold
            return base(x)
        amp = autocast_dtype(x.device) is not None
        As, Bs = [], []
        for a in used:
            A, B = self.lora_A[a].weight, self.lora_B[a].weight
            if A.dtype != x.dtype and not amp:  # fp32 adapters on a half base (see the module docstring)
                A, B = A.to(x.dtype), B.to(x.dtype)
            As.append(A)
            Bs.append(B)
        A, B = stack_lora_weights(As, Bs)
        index = {a: i for i, a in enumerate(used)}
        ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.long, device=x.device)
        scales = [float(self.scaling[a]) for a in used]
        weight = base.weight.t() if is_conv1d(base) else base.weight
        y = multi_lora_linear(x, weight, base.bias, A, B, scales, ids, p, training=p > 0.0,
                              backend=self._fastpeft_backend)
        if any(self.lora_B[a].bias is not None for a in used):  # lora_bias: s·b on its adapter's rows
            zero = y.new_zeros(y.shape[-1])
            rows = torch.stack([zero] + [zero if self.lora_B[a].bias is None else
                                         self.lora_B[a].bias.to(y.dtype) * s for a, s in zip(used, scales)])
            y = y + rows.index_select(0, ids + 1).view(len(names), *([1] * (y.dim() - 2)), -1)
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
