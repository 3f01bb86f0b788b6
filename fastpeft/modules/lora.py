"""LoRA layers: ``LoRALinear`` (``nn.Linear`` and GPT-2's ``Conv1D``, fused op), and the shared
multi-adapter bookkeeping (:class:`LoRALayer`) that ``LoRAEmbedding`` / ``LoRAConv2d``
(:mod:`fastpeft.modules.lora_layers`) reuse.

The layout mirrors HF PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``,
``lora_B[name]`` as bias-free ``nn.Linear``), so PEFT checkpoints map onto it key for key.
Several adapters may be active at once (their updates add up, as in PEFT), and a mixed batch
(``batch_adapters``, one adapter name per row) applies each row's own adapter: in one fused
``multi_lora_linear`` call for ``LoRALinear`` (the frozen GEMM once for the whole batch), with a
loop over the batch's adapters for the other layers.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft._warn import warn_once
from fastpeft.modules.tuner import TunerLayer
from fastpeft.ops.dora import dora_linear
from fastpeft.ops._common import autocast_dtype
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.multi_lora import multi_lora_linear, stack_lora_weights

__all__ = ["LoRALayer", "LoRALinear", "DoRAMagnitude", "is_conv1d"]

_INITS = "True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora'"


def _warn_loop(reason: str) -> None:
    warn_once("LoRALinear", reason, f"LoRALinear: an adapter_names= mixed batch runs the per-adapter loop, not "
              f"the fused multi_lora_linear: {reason}", stacklevel=5)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


class LoRALayer(TunerLayer):
    """Adapters ``name -> (r, alpha, scaling, dropout)`` on a frozen ``base_layer``; merge/unmerge
    restore the base weight bit for bit. Subclasses create the factors and compute the update."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, backend: Optional[str] = None):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_dropout: Dict[str, float] = {}
        self.merged_adapters: List[str] = []
        self._fixups: Dict[str, tuple] = {}
        self.backend = backend
        self.active_adapters = [adapter_name]

    # ---- adapters ---------------------------------------------------------------------------
    def _factors(self) -> Tuple[nn.Module, nn.Module]:
        return self.lora_A, self.lora_B

    def adapter_names(self) -> List[str]:
        return list(self._factors()[0].keys())

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        for d in self._factors():
            v = d[adapter_name]
            yield from ([v] if isinstance(v, nn.Parameter) else v.parameters())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: Union[bool, str] = True) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")
        _check_init(init_lora_weights)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self._create(adapter_name, r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.adapter_names()]
        if missing:
            raise ValueError(f"adapter_name: {missing[0]!r} not in {self.adapter_names()}")
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for d in self._factors():
            del d[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            d.pop(adapter_name, None)

    def unwrap(self, merge: bool) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ---- merge ------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = True) -> None:
        """Fold adapters into the base weight: computed in fp32, cast once. Elements whose round
        trip through the weight's dtype would not come back exactly are recorded (a sparse
        fix-up), so :meth:`unmerge` restores the base weight bit for bit."""
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        W = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                continue
            if name not in self.adapter_names():
                raise ValueError(f"adapter_names: {name!r} not in {self.adapter_names()}")
            delta = self.get_delta_weight(name).reshape(W.shape)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"merge: adapter {name!r} has a non-finite (NaN/inf) delta weight; "
                                 "refusing to corrupt the base weight")
            merged = self._merged_weight(name, W, delta).to(W.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merge: adapter {name!r} gives a non-finite merged weight; "
                                 "refusing to corrupt the base weight")
            back = self._unmerged_weight(name, merged, delta).to(W.dtype)
            bad = (back != W).reshape(-1).nonzero().squeeze(1)
            self._fixups[name] = (bad, W.reshape(-1)[bad].clone())
            W.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the exact base weight."""
        W = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            W.copy_(self._unmerged_weight(name, W, self.get_delta_weight(name).reshape(W.shape)).to(W.dtype))
            idx, vals = self._fixups.pop(name)
            W.view(-1)[idx] = vals

    def _merged_weight(self, name: str, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base weight with adapter ``name`` folded in, in fp32 (LoRA: ``W + delta``)."""
        return W.float() + delta

    def _unmerged_weight(self, name: str, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_merged_weight`, in fp32 (exactness comes from the merge's fix-ups)."""
        return merged.float() - delta

    # ---- forward ----------------------------------------------------------------------------
    def _add_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the output so far) plus adapter ``name``'s contribution."""
        return y + self._delta(name, x)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's update ``s·B(A(drop(x)))`` for input ``x``."""
        raise NotImplementedError

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _fused(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Base + adapter in one fused op where the layer has one (else None)."""
        return None

    def _mixed_fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A mixed batch (``batch_adapters``) in one fused op where the layer has one (else None:
        the per-adapter loop runs)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_adapters is not None:
            if self.merged:
                raise ValueError("adapter_names: cannot run a mixed batch while adapters are merged; unmerge() first")
            y = self._mixed_fused(x)
            if y is not None:
                return y
            y = self._base(x)
            for name, rows in self._row_groups(x.shape[0]):
                rows = rows.to(x.device)
                y = y.index_add(0, rows, self._delta(name, x.index_select(0, rows)).to(y.dtype))
            return y
        if self.merged:
            if self.disable_adapters:
                raise RuntimeError("adapters are merged: unmerge() before disabling them")
            return self._base(x)
        run = self._running()
        if not run:
            return self._base(x)
        y = self._fused(run[0], x)
        if y is None:
            y = self._add_delta(run[0], x, self._base(x))
        for name in run[1:]:
            y = self._add_delta(name, x, y)
        return y

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, merged={self.merged_adapters}"


def _check_init(init) -> None:
    ok = init in (True, False) or (isinstance(init, str) and (
        init.lower() in ("gaussian", "olora", "pissa") or init.lower().startswith("pissa_niter_")))
    if not ok:
        raise ValueError(f"init_lora_weights: expected {_INITS}, got {init!r}")


class DoRAMagnitude(nn.Module):
    """PEFT's ``lora_magnitude_vector[name]`` (a ``DoraLinearLayer``): one ``(out,)`` parameter
    named ``weight``, so checkpoints map key for key."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class LoRALinear(LoRALayer):
    """``y = base(x) + s·B(A(drop(x)))`` with the fused op; ``merge()`` folds it into base.

    With ``use_dora=True`` the adapter is DoRA (HF PEFT's conventions, fused op
    :func:`fastpeft.dora_linear`): ``y = base(x) + (g-1)⊙base_r + g⊙s·B(A(drop(x)))`` with
    ``g = m / ‖W + s·B·A‖`` (norm per output row, detached), ``m = lora_magnitude_vector[name]``
    initialised to ‖W + s·B·A‖ and ``base_r`` the frozen output without bias (or, with dropout
    active, ``drop(x)·Wᵀ``).

    Args:
        base_layer: the ``nn.Linear`` (or GPT-2 ``Conv1D``, weight ``(in, out)``) to adapt (frozen).
        r: rank; lora_alpha: scale numerator (``s = alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the LoRA branch input during training.
        init_lora_weights: True (A kaiming-uniform a=sqrt(5), B zeros), "gaussian" (A normal(0,
            1/r), B zeros), "pissa" / "pissa_niter_<n>" / "olora" (factors from the base weight's
            SVD / QR, the base weight becomes the residual, as PEFT) or False (B random too).
        adapter_name: name of this first adapter (PEFT's "default").
        backend: force a backend for this layer (default: automatic).
        out_slices: LoRA on parts of the output only (e.g. Q and V of a fused qkv): a list of
            ``(start, stop)`` output ranges, each with its own rank-r factors (``lora_A`` stacks
            them: ``(len·r, in)``; ``lora_B`` holds their rows: ``(Σ sizes, r)``).
        use_dora: DoRA instead of plain LoRA for this adapter (not with ``out_slices``).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 adapter_name: str = "default", backend: Optional[str] = None,
                 out_slices: Optional[Sequence[Tuple[int, int]]] = None, use_dora: bool = False):
        if not isinstance(base_layer, nn.Linear) and not is_conv1d(base_layer):
            raise ValueError(f"base_layer: expected nn.Linear (or transformers' Conv1D), got {type(base_layer).__name__}")
        super().__init__(base_layer, adapter_name, backend)
        self.fan_in_fan_out = is_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_slices: Dict[str, Optional[List[Tuple[int, int]]]] = {}
        self.use_dora: Dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (PEFT's name)
        self._dora_norms: Dict[str, torch.Tensor] = {}  # ‖W + s·B·A‖ at merge time, for unmerge
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, out_slices,
                          use_dora)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                     out_slices: Optional[Sequence[Tuple[int, int]]] = None, use_dora: bool = False) -> None:
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora: expected a bool, got {use_dora!r}")
        if use_dora and out_slices is not None:
            raise ValueError("use_dora: DoRA adapts whole layers; it cannot be combined with out_slices")
        slices = out_slices
        if slices is not None:
            slices = [(int(a), int(b)) for a, b in slices]
            if not slices or any(not 0 <= a < b <= self.out_features for a, b in slices):
                raise ValueError(f"out_slices: expected (start, stop) ranges within [0, {self.out_features}], "
                                 f"got {slices}")
            if init_lora_weights not in (True, False, "gaussian"):
                raise ValueError(f"init_lora_weights: {init_lora_weights!r} is not available with out_slices")
        self.out_slices[adapter_name] = slices
        self.use_dora[adapter_name] = use_dora
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoRAMagnitude(self._weight_norm(adapter_name))
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_slices.pop(adapter_name, None)
        self.use_dora.pop(adapter_name, None)
        self._dora_norms.pop(adapter_name, None)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        yield from super().adapter_parameters(adapter_name)
        if adapter_name in self.lora_magnitude_vector:
            yield self.lora_magnitude_vector[adapter_name].weight

    # ---- DoRA ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _weight_norm(self, name: str, W: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W + s·B·A‖ per output row (fp32 maths, the weight's dtype out), W (out, in) the base
        weight unless given: PEFT's ``get_weight_norm``, the magnitude's initial value."""
        W = self._weight() if W is None else W
        d = self.get_delta_weight(name)
        d = d.t() if self.fan_in_fan_out else d
        return torch.linalg.norm(W.float() + d, dim=1).to(self.base_layer.weight.dtype)

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """``m / norm`` (fp32) shaped to scale the stored base weight's output rows."""
        f = self.lora_magnitude_vector[name].weight.float() / norm.float()
        return f.view(1, -1) if self.fan_in_fan_out else f.view(-1, 1)

    def _merged_weight(self, name: str, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if not self.use_dora.get(name):
            return super()._merged_weight(name, W, delta)
        # PEFT: W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW), the norm from the weight before this merge, kept for unmerge.
        Wf = W.float() + delta
        norm = torch.linalg.norm(Wf.t() if self.fan_in_fan_out else Wf, dim=1)
        self._dora_norms[name] = norm
        return self._dora_factor(name, norm) * Wf

    def _unmerged_weight(self, name: str, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if not self.use_dora.get(name):
            return super()._unmerged_weight(name, merged, delta)
        return merged.float() / self._dora_factor(name, self._dora_norms[name]) - delta

    def _dora_add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PEFT's ``DoraLinearVariant.forward`` (unfused): ``y`` is the running result, whose
        bias-free part is the ``base_r`` PEFT reuses when dropout is off."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        W, bias = self._weight(), self.base_layer.bias
        p, s = self.lora_dropout[name], self.scaling[name]
        m = self.lora_magnitude_vector[name].weight
        x = x.to(A.dtype)
        if p > 0 and self.training:
            x = F.dropout(x, p, True)
            base_r = F.linear(x, W.to(x.dtype))
        else:
            base_r = y - bias if bias is not None else y
        norm = torch.linalg.norm(W.to(x.dtype) + s * (B @ A).detach(), dim=1).to(W.dtype).detach()
        g = (m / norm).view(1, -1)
        return y + (g - 1) * base_r + g * F.linear(F.linear(x, A), B) * s

    def _create(self, name: str, r: int) -> None:
        w = self.base_layer.weight
        sl = self.out_slices.get(name)
        ra, nb = (r, self.out_features) if sl is None else (r * len(sl), sum(b - a for a, b in sl))
        self.lora_A[name] = nn.Linear(self.in_features, ra, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, nb, bias=False, device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str] = True) -> None:
        _check_init(init_lora_weights)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            return
        init = init_lora_weights.lower() if isinstance(init_lora_weights, str) else init_lora_weights
        if isinstance(init, str) and init.startswith(("pissa", "olora")):
            return self._init_from_weight(adapter_name, init)
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / self.r[adapter_name])
        nn.init.zeros_(B)

    @torch.no_grad()
    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / OLoRA (as PEFT): factors from the base weight, which keeps the residual."""
        base = self.base_layer
        dtype = base.weight.dtype
        W = self._weight().float()
        r, s = self.r[name], self.scaling[name]
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            B, A = Q[:, :r].contiguous(), R[:r].contiguous()
        else:
            if init == "pissa":
                V, S, Uh = torch.linalg.svd(W, full_matrices=False)
                Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
            else:
                Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=int(init.split("_niter_")[-1]))
                Sr, Uhr = Sr / s, Ur.t()
            A = torch.diag(torch.sqrt(Sr)) @ Uhr
            B = Vr @ torch.diag(torch.sqrt(Sr))
        self.lora_A[name].weight.data = A.to(dtype)
        self.lora_B[name].weight.data = B.to(dtype)
        res = (W - s * B @ A).to(dtype)
        base.weight.data = res.t().contiguous() if self.fan_in_fan_out else res

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def _B_full(self, name: str) -> torch.Tensor:
        B = self.lora_B[name].weight
        sl = self.out_slices.get(name)
        if sl is None:
            return B
        r = self.r[name]
        full = B.new_zeros(self.out_features, r * len(sl))
        off = 0
        for i, (a, b) in enumerate(sl):
            full[a:b, i * r:(i + 1) * r] = B[off:off + b - a]
            off += b - a
        return full

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s·B·A`` in float32, shaped like the base weight."""
        d = (self._B_full(adapter_name).float() @ self.lora_A[adapter_name].weight.float()) * self.scaling[adapter_name]
        return d.t() if self.fan_in_fan_out else d

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _add_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.use_dora.get(name):
            return self._dora_add(name, x, y)
        return y + self._delta(name, x)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora.get(name):
            raise ValueError("adapter_names: mixed batches are not available with DoRA adapters (as in PEFT)")
        p = self.lora_dropout[name]
        A = self.lora_A[name].weight
        h = F.dropout(x.to(A.dtype), p, self.training) if p > 0 else x.to(A.dtype)
        return F.linear(F.linear(h, A), self._B_full(name)) * self.scaling[name]

    def _fused(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        A = self.lora_A[name].weight
        # Under autocast the op casts x, W and the fp32 LoRA weights to the autocast dtype itself
        # (as autocast does for nn.Linear), so mixed dtypes still take the fused path there.
        if (x.dtype != A.dtype or x.dtype != self.base_layer.weight.dtype) and autocast_dtype(x.device) is None:
            return None
        if self.use_dora.get(name):
            m = self.lora_magnitude_vector[name].weight
            if m.dtype != x.dtype and autocast_dtype(x.device) is None:
                return None
            return dora_linear(x, self._weight(), self.base_layer.bias, A, self.lora_B[name].weight, m,
                               self.scaling[name], self.lora_dropout[name], training=self.training,
                               backend=self.backend)
        return lora_linear(x, self._weight(), self.base_layer.bias, A, self._B_full(name), self.scaling[name],
                           self.lora_dropout[name], training=self.training, backend=self.backend)

    def _mixed_fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every row through its own adapter with ``multi_lora_linear``: the frozen GEMM once for
        the batch, the rank-r work grouped by adapter. The adapters of the batch are stacked
        (zero-padded to the largest rank), so each one's gradient flows back to its own factors;
        rows whose adapter this layer does not hold (or ``"__base__"``) run the base layer only."""
        names = self.batch_adapters
        if x.dim() < 2 or len(names) != x.shape[0]:
            raise ValueError(f"adapter_names: expected one name per row ({x.shape[0] if x.dim() else 0}), "
                             f"got {len(names)}")
        wanted = set(names)
        used = [n for n in self.adapter_names() if n in wanted]
        if not used:
            return self._base(x)
        if any(self.use_dora.get(n) for n in used):
            raise ValueError("adapter_names: mixed batches are not available with DoRA adapters (as in PEFT)")
        W = self._weight()
        mixed = x.dtype != W.dtype or any(self.lora_A[n].weight.dtype != x.dtype for n in used)
        if mixed and autocast_dtype(x.device) is None:
            # the per-adapter loop casts per adapter (as PEFT); the fused op takes one dtype
            _warn_loop("the input, base weight and adapter dtypes differ outside autocast")
            return None
        drops = {self.lora_dropout[n] for n in used}
        if self.training and len(drops) > 1:
            _warn_loop(f"the batch's adapters have different dropout rates in training ({sorted(drops)}); "
                       f"the fused op takes one rate per call")
            return None
        A, B = stack_lora_weights([self.lora_A[n].weight for n in used], [self._B_full(n) for n in used])
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.long, device=x.device)
        return multi_lora_linear(x, W, self.base_layer.bias, A, B, [self.scaling[n] for n in used], ids,
                                 max(drops), training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
