"""Sites that hold named adapters inside a model (used by the model-level API).

* bottleneck-adapter sites: :class:`AdapterLayer` (``adapter(base_layer(x))``, Houlsby /
  Pfeiffer), :class:`ParallelAdapterSlot` (fastpeft ViT's ``Block.parallel_adapter``),
  :class:`BertParallelOutput` (post-norm BERT) and :class:`ParallelMLP` (pre-norm HF blocks, with
  :class:`CaptureInput` handing it the residual stream). Several active adapters stack
  (sequential sites) or add their branches (parallel sites).
* :class:`ModulesToSave`: PEFT's ``ModulesToSaveWrapper`` layout (``original_module`` stays
  untouched, ``modules_to_save[name]`` is the adapter's trained copy), so ``disable_adapter()``
  gives the base model and every adapter has its own head.

All are :class:`fastpeft.modules.tuner.TunerLayer`\\ s: they follow ``set_adapter``, disabling and
mixed-adapter batches (each row through its own adapter).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from fastpeft.modules.tuner import BASE, TunerLayer

__all__ = ["AdapterSlot", "AdapterLayer", "ParallelAdapterSlot", "BertParallelOutput", "ParallelMLP", "CaptureInput",
           "ModulesToSave", "add_modules_to_save"]


class AdapterSlot(TunerLayer):
    """Named bottleneck adapters at one site."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def adapter_names(self) -> List[str]:
        return list(self.adapters.keys())

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        return self.adapters[adapter_name].parameters()

    def delete_adapter(self, adapter_name: str) -> None:
        self.adapters.pop(adapter_name)

    def _busy(self) -> bool:
        return self.batch_adapters is not None or bool(self._running())

    def _chain(self, y: torch.Tensor, step: Callable) -> torch.Tensor:
        """Apply ``step(adapter, rows, y_rows)`` for the running adapters in turn, or per row group
        in a mixed batch (rows without an adapter keep ``y``)."""
        if self.batch_adapters is not None:
            out = y
            for name, rows in self._row_groups(y.shape[0]):
                rows = rows.to(y.device)
                out = out.index_copy(0, rows, step(self.adapters[name], rows, y.index_select(0, rows)))
            return out
        for name in self._running():
            y = step(self.adapters[name], None, y)
        return y


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


class AdapterLayer(AdapterSlot):
    """``adapter(base_layer(x))``: a sequential (Houlsby / Pfeiffer) adapter after a projection."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, *args, **kwargs):
        return self._chain(self.base_layer(*args, **kwargs), lambda ad, rows, y: ad(y))


class ParallelAdapterSlot(AdapterSlot):
    """Fills fastpeft ViT's ``Block.parallel_adapter``: ``residual + s·f(x)`` (AdaptFormer)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._chain(residual, lambda ad, rows, r: ad(_rows(x, rows), residual=r))


class BertParallelOutput(AdapterSlot):
    """Replaces a post-norm BERT ``output`` (dense, dropout, LayerNorm): the parallel adapter reads
    the FFN's residual input: ``LN(drop(dense(h)) + x + s·f(x))``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._busy():
            return self.base_layer(hidden_states, input_tensor, *args, **kwargs)
        b = self.base_layer
        res = b.dropout(b.dense(hidden_states)) + input_tensor
        res = self._chain(res, lambda ad, rows, r: ad(_rows(input_tensor, rows), residual=r))
        return b.LayerNorm(res)


class CaptureInput(nn.Module):
    """Wraps a pre-MLP norm and hands its input (the residual stream) to a :class:`ParallelMLP`."""

    def __init__(self, base_layer: nn.Module, sink: "ParallelMLP"):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_sink", sink)  # not a submodule: it lives in its own place

    def forward(self, x, *args, **kwargs):
        self._sink._x = x
        return self.base_layer(x, *args, **kwargs)


class ParallelMLP(AdapterSlot):
    """Replaces a pre-norm block's ``mlp`` (HF ViT, LLaMA, GPT-2): ``mlp(norm(x)) + s·f(x)`` where
    ``x`` (the residual stream) is captured from the norm in front of it. The block adds ``x``.
    (HF ViT applies its hidden dropout after the MLP, so in training it also drops the adapter
    branch; its default hidden_dropout_prob is 0.)"""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._x: Optional[torch.Tensor] = None

    def forward(self, h, *args, **kwargs):
        y = self.base_layer(h, *args, **kwargs)
        x, self._x = self._x, None
        if not self._busy():
            return y
        if x is None or x.shape != h.shape:
            raise RuntimeError("ParallelMLP: the residual stream was not captured from the norm before the MLP")
        return self._chain(y, lambda ad, rows, r: ad(_rows(x, rows), residual=r))


class ModulesToSave(TunerLayer):
    """A module trained and saved whole by some adapters (``modules_to_save``): each adapter gets
    its own copy; ``original_module`` is never changed (used while disabled, for ``"__base__"``
    rows and when no active adapter has a copy). Attributes (``weight`` ...) read through to the
    module in use."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()

    def add(self, adapter_name: str) -> nn.Module:
        m = copy.deepcopy(self.original_module)
        m.requires_grad_(True)
        self.modules_to_save[adapter_name] = m
        return m

    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        return self.modules_to_save[adapter_name].parameters()

    def delete_adapter(self, adapter_name: str) -> None:
        self.modules_to_save.pop(adapter_name)

    def unwrap(self, merge: bool) -> nn.Module:
        return self.active_module() if merge else self.original_module

    def active_module(self) -> nn.Module:
        run = self._running()
        return self.modules_to_save[run[0]] if run else self.original_module

    def forward(self, x, *args, **kwargs):
        if self.batch_adapters is None:
            return self.active_module()(x, *args, **kwargs)
        names = self.batch_adapters
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names: expected one name per row ({x.shape[0]}), got {len(names)}")
        out = None
        groups = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.modules_to_save else BASE, []).append(i)
        for n, rows in groups.items():
            idx = torch.tensor(rows, dtype=torch.long, device=x.device)
            m = self.original_module if n == BASE else self.modules_to_save[n]
            y = m(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = y.new_zeros((x.shape[0],) + tuple(y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_modules") or "_modules" not in self.__dict__:
                raise
            return getattr(self.active_module(), name)


def add_modules_to_save(model: nn.Module, adapter_name: str, names: List[str], active: List[str], journal) -> None:
    """Give ``adapter_name`` its own copy of every module named (or ending in) one of ``names``,
    wrapping it in :class:`ModulesToSave` on first use; every change goes into ``journal``."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    roots = [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in names)
             and not any(n.startswith(w + ".") for w in wrapped)]
    if names and not roots:
        # PEFT lists both "classifier" and "score" for SEQ_CLS: names that match nothing are
        # skipped as PEFT does, but a list that matches nothing at all is a mistake
        raise ValueError(f"modules_to_save: {names!r} matched no module of {type(model).__name__}")
    for r in roots:
        w = model.get_submodule(r)
        if not isinstance(w, ModulesToSave):
            w = ModulesToSave(w)
            journal.replace(model, r, w)
        w.add(adapter_name)
        w.active_adapters = list(active)
        journal.on_undo(lambda w=w: w.modules_to_save.pop(adapter_name))
