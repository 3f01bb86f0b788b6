"""The plug-in interface of a PEFT method, the registry, and the undo journal.

A method is one subclass of :class:`PeftMethod` decorated with :func:`register_method`; its
``config_class`` (a :class:`fastpeft.config._Config` with a ``peft_type``) is how configs and
``adapter_config.json`` files find it. One instance exists per adapter of a ``PeftModel``.

What a method implements (everything else has a default):

==================  =====================================================================
``inject``          change the model for adapter ``self.name`` (record every change in the
                    journal so a failed injection / load is undone exactly)
``tensors``         the adapter's state under PEFT's checkpoint keys (live parameters, or
                    computed tensors such as projected prefixes)
``load``            assign checkpoint tensors (default: copy into the live parameters)
``parameters``      the adapter's trainable tensors (default: the parameters in ``tensors``)
``delete``          remove the adapter (default: tuner layers delete it; nothing else)
``merge/unmerge``   fold into the base weights (``mergeable = True``)
``wrap_forward``    run the model call (prompt methods feed prompts / prefixes here)
``generate``        run ``model.generate`` (prompt methods: with their prompts, KV cache)
``disabled``        a context in which the base model runs (e.g. BitFit's original biases)
==================  =====================================================================

Layer-level behaviour (activation, disabling, mixed-adapter batches) lives in the tuner layers
(:mod:`fastpeft.modules.tuner`), which ``PeftModel`` drives generically.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Tuple, Type

import torch
from torch import nn

__all__ = ["PeftMethod", "register_method", "method_for", "registered", "Journal", "get_module", "parent_of",
           "first_param"]

_REGISTRY: Dict[str, Type["PeftMethod"]] = {}


def register_method(cls: Type["PeftMethod"]) -> Type["PeftMethod"]:
    """Class decorator: make ``cls`` the method for ``cls.config_class.peft_type``."""
    pt = cls.config_class.peft_type
    if not pt:
        raise ValueError(f"{cls.__name__}: config_class {cls.config_class.__name__} has no peft_type")
    _REGISTRY[pt] = cls
    return cls


def registered() -> Dict[str, Type["PeftMethod"]]:
    """``{peft_type: method class}`` of every registered method (built-ins loaded on first use)."""
    from fastpeft import methods  # noqa: F401  (imports the built-in plug-ins)
    return dict(_REGISTRY)


def method_for(config) -> Type["PeftMethod"]:
    reg = registered()
    pt = getattr(config, "peft_type", None)
    if pt not in reg or not isinstance(config, reg[pt].config_class):
        raise ValueError(f"config: expected a fastpeft method config ({', '.join(c.config_class.__name__ for c in reg.values())}), "
                         f"got {type(config).__name__}")
    return reg[pt]


class Journal:
    """Every change to the base model, so a failed injection / load can be undone exactly."""

    def __init__(self):
        self._undo: List[Callable[[], None]] = []

    def set_module(self, parent: nn.Module, attr: str, new: Optional[nn.Module]) -> None:
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._undo.append(lambda: setattr(parent, attr, old))

    def replace(self, model: nn.Module, path: str, new: nn.Module) -> None:
        parent, attr = parent_of(model, path)
        self.set_module(parent, attr, new)

    def requires_grad(self, p: torch.Tensor, flag: bool) -> None:
        old = p.requires_grad
        p.requires_grad_(flag)
        self._undo.append(lambda: p.requires_grad_(old))

    def keep_tensor(self, t: torch.Tensor) -> None:
        """Restore ``t``'s current values on rollback (e.g. a base weight PiSSA rewrites)."""
        saved = t.detach().clone()
        self._undo.append(lambda: t.data.copy_(saved))

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def parent_of(model: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return get_module(model, parent), attr


def first_param(m: nn.Module) -> torch.Tensor:
    for p in m.parameters():
        return p
    return torch.empty(0)


class PeftMethod:
    """One adapter of one method inside a ``PeftModel`` (see the module docstring)."""

    config_class: type = type(None)
    #: may be folded into the base weights (merge_and_unload)
    mergeable = False
    #: its layers run a mixed-adapter batch row by row (``adapter_names=[...]``)
    supports_mixed_batch = False
    #: extra methods a PeftModel exposes for this method, e.g. ("add_weighted_adapter",)
    model_api: Tuple[str, ...] = ()

    def __init__(self, peft_model, name: str, config):
        self.pm = peft_model
        self.name = name
        self.config = config

    @property
    def model(self) -> nn.Module:
        return self.pm.base_model.model

    @property
    def is_prompt_learning(self) -> bool:
        return bool(self.config.is_prompt_learning)

    # ---- lifecycle --------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, config):
        """A copy of ``config`` with model-dependent fields filled in; never mutates ``config``."""
        return config

    def inject(self, journal: Journal, loading: bool = False) -> None:
        raise NotImplementedError

    def tensors(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def optional_tensors(self) -> Dict[str, torch.Tensor]:
        """Checkpoint keys that may be present but are not required (PEFT extras)."""
        return {}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in {**self.tensors(), **self.optional_tensors()}.items():
                if k in tensors and isinstance(p, torch.Tensor):
                    p.copy_(tensors[k])

    def parameters(self) -> Iterable[nn.Parameter]:
        return [t for t in self.tensors().values() if isinstance(t, nn.Parameter)]

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def delete(self) -> None:
        pass

    # ---- merging ----------------------------------------------------------------------------
    def merge(self) -> None:
        raise ValueError(f"merge: {type(self.config).__name__} adapters cannot be folded into the base weights")

    def unmerge(self) -> None:
        pass

    # ---- forward hooks ----------------------------------------------------------------------
    def wrap_forward(self, call: Callable, args: tuple, kwargs: dict):
        return call(*args, **kwargs)

    def generate(self, generate: Callable, kwargs: dict):
        return generate(**kwargs)

    def disabled(self) -> ContextManager:
        return contextlib.nullcontext()


def own_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The model's own parameters, not those adapters brought (LoRA factors, adapter modules,
    ``modules_to_save`` copies and originals): everything outside tuner layers but their
    ``base_layer``."""
    from fastpeft.modules.tuner import TunerLayer
    tuners = [n + "." for n, m in model.named_modules() if isinstance(m, TunerLayer)]
    return {pn: p for pn, p in model.named_parameters()
            if not any(pn.startswith(t) and not pn.startswith(t + "base_layer.") for t in tuners)}


def with_seq_cls_head(model: nn.Module, config):
    """As PEFT's PeftModelForSequenceClassification: with task_type "SEQ_CLS" the classifier head
    ("classifier" / "score") is trained and saved too. Returns a copy; ``config`` is kept."""
    if getattr(config, "task_type", None) != "SEQ_CLS":
        return config
    import dataclasses
    present = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    mts = list(config.modules_to_save or [])
    extra = [h for h in ("classifier", "score") if h in present and h not in mts]
    return dataclasses.replace(config, modules_to_save=mts + extra) if extra else config
