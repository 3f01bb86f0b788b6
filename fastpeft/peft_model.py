"""Model-level API: ``get_peft_model(model, config)`` -> :class:`PeftModel`.

One wrapper for every method. What each method does lives in its plug-in
(``fastpeft/methods/<method>.py``, found by ``peft_type``); what a model looks like lives in the
model-family table (:mod:`fastpeft.families`); the layers that hold adapters follow one protocol
(:class:`fastpeft.modules.tuner.TunerLayer`). This file only composes them: injection with an undo
journal, ``modules_to_save``, active adapters (several at once, e.g. LoRA with a prompt method),
mixed-adapter batches, ``generate``, merging and PEFT-format checkpoints.

The parameter layout mirrors Hugging Face PEFT (``base_model.model.<path>``,
``prompt_encoder.<name>.embedding.weight``, ``<module>.modules_to_save.<name>``), so checkpoints
written by ``save_pretrained`` use PEFT's key names and load into ``peft.PeftModel`` and back.
Checkpoints are validated completely before anything is assigned; a failed load undoes the
injection, so the model is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
import inspect
import types
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastpeft import checkpoint as ckpt
from fastpeft import families
from fastpeft.config import _Config, config_from_dict
from fastpeft.methods.base import Journal, PeftMethod, get_module, method_for, parent_of
from fastpeft.modules.slots import (AdapterLayer, BertParallelOutput, ModulesToSave, ParallelAdapterSlot, ParallelMLP,
                                    add_modules_to_save)
from fastpeft.modules.tuner import BASE, TunerLayer, freeze_all_but

__all__ = ["get_peft_model", "PeftModel", "AdapterLayer", "ParallelAdapterSlot", "BertParallelOutput",
           "ParallelMLP"]

_head_paths = families.head_paths  # kept for older imports


class _BaseModel(nn.Module):
    """Holds the user's model as ``.model`` so parameter names read ``base_model.model.<path>``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with one or more fastpeft adapters. Build it with :func:`get_peft_model` or
    :meth:`from_pretrained`; call it like the model it wraps (``adapter_names=[...]``: one adapter
    per row, ``"__base__"`` for none; LoRA rows run fused in one ``multi_lora_linear`` per layer;
    prefix / prompt tuning adapters give each sample its own prefixes or prompts)."""

    def __init__(self, model: nn.Module, config: _Config, adapter_name: str = "default", *, _loading: bool = False):
        super().__init__()
        self.base_model = _BaseModel(model)
        self.peft_config: Dict[str, _Config] = {}
        self.prompt_encoder = nn.ModuleDict()
        self._methods: Dict[str, PeftMethod] = {}
        self._active: List[str] = [adapter_name]
        self._disabled = False
        journal = Journal()
        try:
            for p in model.parameters():
                journal.requires_grad(p, False)
            self._inject(adapter_name, config, journal, _loading)
        except Exception:
            journal.rollback()
            raise
        # kept until construction is confirmed (from_pretrained undoes it when the weights do not fit)
        object.__setattr__(self, "_init_journal", journal)
        self.set_adapter(adapter_name)
        self._expose_signature()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_init_journal", None)  # undo closures of a construction in progress
        state.pop("forward", None)  # bound to this instance; rebuilt by __setstate__
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._expose_signature()

    def __reduce_ex__(self, protocol):
        # pickle / deepcopy by the public class (a per-base-model subclass, see _expose_signature, is
        # not importable by name); __setstate__ gives the copy its subclass again
        rv = super().__reduce_ex__(protocol)
        public = type(self).__dict__.get("_fastpeft_public_class")
        if public is not None and isinstance(rv, tuple) and len(rv) >= 2 and rv[1] and rv[1][0] is type(self):
            # pickle insists that copyreg.__newobj__'s class be the object's own: rebuild through ours
            fn = _new_instance if rv[0] is copyreg.__newobj__ else rv[0]
            rv = (fn, (public,) + tuple(rv[1][1:])) + tuple(rv[2:])
        return rv

    def _expose_signature(self) -> None:
        """Give ``self.forward`` the wrapped model's signature (plus ``adapter_names``).

        Tools read a model's inputs from ``inspect.signature(model.forward)``: HF ``Trainer``
        (``remove_unused_columns`` drops every batch column the forward does not name, and Hugging
        Face PEFT models are only recognised by type) and ``accepts_loss_kwargs``. A bare
        ``forward(*args, **kwargs)`` would hide them all. The behaviour is :meth:`forward`'s; only
        the instance's bound method carries the signature (as an instance attribute, the way
        accelerate wraps ``model.forward``), so nothing changes for callers.

        HF ``Trainer`` also reads the label names (``find_labels``) and ``can_return_loss`` from
        the model's *class* (``type(model).forward``; the wrapped model's class for Hugging Face
        PEFT models). So the instance also gets a subclass of its class, one per wrapped model
        class, whose ``forward`` carries the wrapped class's ``forward`` signature: a plain
        ``Trainer`` finds ``labels`` and computes evaluation losses without
        ``TrainingArguments(label_names=...)``. It is named like its class (for a
        ``...QuestionAnswering`` model, with that suffix, which ``find_labels`` looks for), pickles
        and copies as the class itself, and adds nothing else.
        """
        try:
            base = inspect.signature(self.base_model.model.forward)
        except (TypeError, ValueError):  # a forward without an inspectable signature: keep *args, **kwargs
            return
        params = _with_adapter_names(base)
        try:
            sig = base.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)] + params)
        except ValueError:  # e.g. a parameter named self: keep the generic signature
            return
        public = type(self).__dict__.get("_fastpeft_public_class", type(self))
        self.__dict__["forward"] = types.MethodType(_forward_with_signature(public.forward, sig), self)
        # and the class: HF Trainer reads label names and can_return_loss from type(model).forward
        # (for Hugging Face PEFT models, from the wrapped model's class)
        cls = _signature_class(public, type(self.base_model.model))
        if cls is not None:
            self.__class__ = cls

    # ---- delegation -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "prompt_encoder", "_methods") or name.startswith("__"):
                raise
            for meth in self.__dict__.get("_methods", {}).values():
                if name in type(meth).model_api:  # a method's extra API, e.g. LoRA's add_weighted_adapter
                    return functools.partial(getattr(type(meth), name), self)
            return getattr(self.base_model.model, name)

    @property
    def active_adapters(self) -> List[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, List[str]]:
        """The active adapter's name (a list when several are active, as PEFT's tuner models)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @active_adapter.setter
    def active_adapter(self, names) -> None:
        self.set_adapter(names)

    @property
    def active_peft_config(self) -> _Config:
        return self.peft_config[self._active[0]]

    def _layers(self) -> List[Tuple[str, TunerLayer]]:
        return [(n, m) for n, m in self.base_model.model.named_modules() if isinstance(m, TunerLayer)]

    # ---- injection --------------------------------------------------------------------------
    def _inject(self, name: str, config: _Config, journal: Journal, loading: bool = False) -> None:
        if name in self.peft_config:
            raise ValueError(f"adapter_name: {name!r} already exists ({list(self.peft_config)})")
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise ValueError(f"adapter_name: expected a non-empty str without '.', got {name!r}")
        cls = method_for(config)
        model = self.base_model.model
        config = cls.prepare_config(model, copy.deepcopy(config))  # the caller's config is never touched
        meth = cls(self, name, config)
        meth.inject(journal, loading)
        add_modules_to_save(model, name, getattr(config, "modules_to_save", None) or [], self._active, journal)
        self._methods[name] = meth
        self.peft_config[name] = config
        journal.on_undo(lambda: (self.peft_config.pop(name, None), self._methods.pop(name, None)))

    def _save_roots(self, name: str) -> List[Tuple[str, nn.Module]]:
        return [(n, m.modules_to_save[name]) for n, m in self._layers()
                if isinstance(m, ModulesToSave) and name in m.modules_to_save]

    # ---- adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: _Config) -> None:
        """Add another adapter (not active until :meth:`set_adapter`). On error nothing changes."""
        journal = Journal()
        try:
            self._inject(adapter_name, config, journal)
        except Exception:
            journal.rollback()
            raise
        self.set_adapter(self._active)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_name`` (or a list: several at once, their updates add up, e.g. LoRA with
        a prompt method) the adapters that run and train; the others' weights are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ValueError(f"adapter_name: {missing[0] if missing else names!r} not in {list(self.peft_config)}")
        prompts = [n for n in names if self._methods[n].is_prompt_learning]
        if len(prompts) > 1:
            raise ValueError(f"set_adapter: one prompt-learning adapter runs at a time, got {prompts}")
        self._active = names
        for _, m in self._layers():
            m.active_adapters = list(names)
            freeze_all_but(m, names)
        for n, meth in self._methods.items():  # frozen first, so shared tensors end up trainable
            if n not in names:
                for p in meth.parameters():
                    p.requires_grad_(False)
        for n in names:
            for p in self._methods[n].parameters():
                p.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(self.peft_config)}")
        self._methods[adapter_name].delete()
        for _, m in self._layers():
            if adapter_name in m.adapter_names():
                m.delete_adapter(adapter_name)
        del self.peft_config[adapter_name], self._methods[adapter_name]
        rest = [n for n in self._active if n != adapter_name]
        if self.peft_config:
            self.set_adapter(rest or next(iter(self.peft_config)))
        else:  # no adapter left: the base model runs
            self._active = []
            for _, m in self._layers():
                m.active_adapters = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the base model (merged LoRA must be unmerged first)."""
        layers = [m for _, m in self._layers()]
        if any(m.merged for m in layers):
            raise RuntimeError("disable_adapter: LoRA weights are merged into the base; unmerge() first")
        with contextlib.ExitStack() as stack:
            for meth in self._methods.values():
                stack.enter_context(meth.disabled())
            for m in layers:
                m.disable_adapters = True
            self._disabled = True
            try:
                yield
            finally:
                for m in layers:
                    m.disable_adapters = False
                self._disabled = False

    # ---- activation checkpointing --------------------------------------------------------------
    def enable_input_require_grads(self) -> None:
        """Make the model's input activations require grad, for reentrant activation checkpointing.

        ``torch.utils.checkpoint(..., use_reentrant=True)`` computes gradients for the parameters
        inside a segment only if one of the segment's tensor inputs requires grad. Under a frozen
        base nothing before the first adapter does, so a checkpointed first block would silently
        get no gradients (torch warns "None of the inputs have requires_grad=True"). This hooks
        the input word embeddings' output (the base model's ``get_input_embeddings()``, or an
        ``embeddings.word_embeddings`` module; a Hugging Face base model's own method does this), or, for a
        model without one (e.g. a ViT), makes the floating-point tensors passed to the base model
        require grad (a detached alias; the caller's tensors are not modified). Gradients of the
        PEFT parameters are then those of the model without checkpointing. Hugging Face
        ``gradient_checkpointing_enable()`` with ``use_reentrant=True`` does this by itself. Undo
        with :meth:`disable_input_require_grads`.
        """
        self.disable_input_require_grads()
        base = self.get_base_model()
        if callable(getattr(base, "enable_input_require_grads", None)):
            base.enable_input_require_grads()  # Hugging Face's: a hook on every input embedding
            return
        emb = None
        if callable(getattr(base, "get_input_embeddings", None)):
            emb = base.get_input_embeddings()
        if not isinstance(emb, nn.Module):
            emb = next((m for n, m in base.named_modules()
                        if n == "embeddings.word_embeddings" or n.endswith(".embeddings.word_embeddings")), None)
        if emb is not None:
            handle = emb.register_forward_hook(_output_requires_grad)
        else:
            handle = base.register_forward_pre_hook(_float_inputs_require_grad, with_kwargs=True)
        self.__dict__["_input_grad_hook"] = handle

    def disable_input_require_grads(self) -> None:
        """Remove what :meth:`enable_input_require_grads` installed (nothing if it was not)."""
        handle = self.__dict__.pop("_input_grad_hook", None)
        if handle is not None:
            handle.remove()
        base = self.get_base_model()
        if callable(getattr(base, "disable_input_require_grads", None)):
            base.disable_input_require_grads()  # Hugging Face's hooks (also gradient_checkpointing_enable's)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Optional[Sequence[str]]) -> Iterator[None]:
        """Each row through its own adapter (PEFT's ``adapter_names``); refused, never ignored,
        where a method cannot do it."""
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown} (have {list(self.peft_config)} and {BASE!r})")
        no_rows = [n for n, m in self._methods.items() if not m.supports_mixed_batch and
                   (n in names or n in self._active or not m.is_prompt_learning)]
        if no_rows:
            raise ValueError(f"adapter_names: mixed-adapter batches need every adapter in play to run per row; "
                             f"{no_rows} ({type(self.peft_config[no_rows[0]]).__name__}) cannot")
        layers = [m for _, m in self._layers()]
        if any(m.merged for m in layers):
            raise ValueError("adapter_names: cannot run a mixed batch while adapters are merged; unmerge() first")
        for m in layers:
            m.batch_adapters = names
        try:
            yield
        finally:
            for m in layers:
                m.batch_adapters = None

    # ---- forward / generate -----------------------------------------------------------------
    def _prompt_method(self) -> Optional[PeftMethod]:
        if self._disabled:
            return None
        return next((self._methods[n] for n in self._active if self._methods[n].is_prompt_learning), None)

    def _row_prompts(self, adapter_names: Optional[Sequence[str]]) -> Optional[List[PeftMethod]]:
        """For ``adapter_names`` naming prompt-learning adapters (one prefix / prompt set per sample,
        the frozen model shared): the method of every row (None for ``"__base__"`` rows: no virtual
        tokens); None when the names are not prompt adapters (the layers' mixed batch runs them).
        The adapters may differ in ``num_virtual_tokens`` where the method can pad (see
        ``fastpeft.methods._prompting``); it raises where it cannot."""
        if adapter_names is None:
            return None
        names = list(adapter_names)
        prompt = [n for n in dict.fromkeys(names) if n in self._methods and self._methods[n].is_prompt_learning]
        if not prompt:
            return None
        other = sorted({n for n in names if n not in prompt and n != BASE})
        if other:
            raise ValueError(f"adapter_names: a batch of prompt-learning adapters needs one (or {BASE!r}) for every "
                             f"sample; {other} cannot be mixed with {prompt} (no per-row prompt for them)")
        meths = [self._methods[n] for n in prompt]
        kinds = {type(m) for m in meths}
        if len(kinds) > 1 or not getattr(meths[0], "supports_row_prompts", False):
            kinds = [type(self.peft_config[n]).__name__ for n in prompt]
            raise ValueError(f"adapter_names: per-sample prompts need adapters of one method that supports them "
                             f"(prefix tuning or prompt tuning), got {kinds}")
        return [None if n == BASE else self._methods[n] for n in names]

    def forward(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        model = self.base_model.model
        rows = self._row_prompts(adapter_names)
        if rows is not None:  # one prompt-learning adapter per sample over the shared frozen model
            return next(m for m in rows if m is not None).wrap_forward(model, args, kwargs, rows=rows)
        with self._mixed_batch(adapter_names):
            meth = self._prompt_method()
            return model(*args, **kwargs) if meth is None else meth.wrap_forward(model, args, kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The base model's ``generate`` with the active adapters, prompt methods included
        (greedy ``generate`` equals greedy decoding through :meth:`forward`)."""
        model = self.base_model.model
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate()")
        if args:
            kwargs["input_ids"] = args[0]
        rows = self._row_prompts(adapter_names)
        if rows is not None:
            return next(m for m in rows if m is not None).generate(model.generate, kwargs, rows=rows)
        with self._mixed_batch(adapter_names):
            meth = self._prompt_method()
            return model.generate(**kwargs) if meth is None else meth.generate(model.generate, kwargs)

    # ---- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[List[str]] = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, in place."""
        for n in adapter_names or self._active:
            self._methods[n].merge()

    def unmerge(self) -> None:
        """Undo :meth:`merge_adapter`, restoring the base weights bit for bit."""
        for meth in self._methods.values():
            meth.unmerge()

    unmerge_adapter = unmerge

    def _check_mergeable(self) -> None:
        bad = [n for n, m in self._methods.items() if not m.mergeable]
        if bad:
            raise ValueError(f"merge_and_unload: adapters {bad} ({type(self.peft_config[bad[0]]).__name__}) "
                             "cannot be folded into the base weights; only LoRA (and BitFit) can")

    def merge_and_unload(self, adapter_names: Optional[List[str]] = None) -> nn.Module:
        """Merge LoRA into the base weights and return the plain model (trained copies of
        ``modules_to_save`` in place of the originals)."""
        self._check_mergeable()
        self.merge_adapter(adapter_names)
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Return the plain base model without merging (original ``modules_to_save`` modules)."""
        self._check_mergeable()
        self.unmerge()
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        model = self.base_model.model
        for path, m in reversed(self._layers()):
            parent, attr = parent_of(model, path)
            setattr(parent, attr, m.unwrap(merge))
        return model

    # ---- parameters -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """``-> (trainable, all)`` parameter counts (PEFT's convention)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    # ---- checkpoints ------------------------------------------------------------------------
    def _adapter_tensors(self, name: str) -> Dict[str, torch.Tensor]:
        """PEFT-named tensors of adapter ``name`` (live parameters, or computed prompts)."""
        meth = self._methods[name]
        out = dict(meth.tensors())
        # PEFT wraps tuner methods as base_model (LoraModel).model, prompt methods as base_model
        pre = "base_model." if meth.is_prompt_learning else "base_model.model."
        for path, m in self._save_roots(name):
            out.update({f"{pre}{path}.{pn}": p for pn, p in m.named_parameters()})
        return out

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[List[str]] = None,
                        is_main_process: bool = True) -> None:
        """Write each adapter in PEFT's layout: ``default`` in ``save_directory``, others in
        ``save_directory/<name>``: ``adapter_config.json`` + ``adapter_model.safetensors``, each
        file written atomically (:func:`fastpeft.checkpoint.write_checkpoint`).

        Distributed: call it on every rank. Parameters sharded by FSDP2 (``DTensor``) are gathered
        to full tensors (a collective, hence every rank); only ``is_main_process`` writes. Only the
        adapter tensors are saved, never the base model.
        """
        import os
        names = selected_adapters or list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"selected_adapters: {name!r} not in {list(self.peft_config)}")
        for name in names:
            d = save_directory if name == "default" else os.path.join(save_directory, name)
            with torch.no_grad():
                tensors = {k: _full_tensor(t) for k, t in self._adapter_tensors(name).items()}
            if is_main_process:
                ckpt.write_checkpoint(d, self._methods[name].config_dict(), tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Load a fastpeft- or PEFT-saved adapter onto ``model``. A bad checkpoint raises (naming
        the file and key) and leaves ``model`` exactly as it was."""
        config, tensors, w_path = _read_checkpoint(model_id)
        pm = cls(model, config, adapter_name, _loading=True)  # injects; rolled back if the weights do not fit
        try:
            pm._load_tensors(adapter_name, tensors, w_path)
        except Exception:
            pm._init_journal.rollback()
            raise
        object.__setattr__(pm, "_init_journal", None)
        if not is_trainable:
            pm.eval()
            for p in pm.parameters():
                p.requires_grad_(False)
        return pm

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Load another adapter from a checkpoint into this model (not activated).

        If ``adapter_name`` already exists, its weights are replaced in place (resuming training,
        as HF ``Trainer`` does): the checkpoint must hold the same method and exactly this
        adapter's tensors (names, shapes); it is validated completely before any tensor is copied,
        so a bad checkpoint raises and leaves the model untouched. Load before wrapping the model
        in FSDP2 (``fully_shard``), whose parameters are shards.
        """
        config, tensors, w_path = _read_checkpoint(model_id)
        if adapter_name in self.peft_config:
            have = self.peft_config[adapter_name]
            if type(config) is not type(have):
                raise ValueError(f"{w_path}: holds a {type(config).__name__} adapter; {adapter_name!r} is a "
                                 f"{type(have).__name__}")
            self._load_tensors(adapter_name, tensors, w_path)
            if adapter_name in self._active:
                self.set_adapter(self._active)  # trainable again if it is active
            if not is_trainable:
                for p in self._methods[adapter_name].parameters():
                    p.requires_grad_(False)
            return
        journal = Journal()
        try:
            self._inject(adapter_name, config, journal, loading=True)
            self._load_tensors(adapter_name, tensors, w_path)
        except Exception:
            journal.rollback()
            raise
        self.set_adapter(self._active)
        if not is_trainable:
            for t in self._adapter_tensors(adapter_name).values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(False)

    def _load_tensors(self, name: str, tensors: Dict[str, torch.Tensor], path: str) -> None:
        meth = self._methods[name]
        with torch.no_grad():
            expected = self._adapter_tensors(name)
            optional = meth.optional_tensors()
        sharded = [k for k, t in expected.items() if _is_dtensor(t)]
        if sharded:
            raise ValueError(f"{path}: cannot load into {sharded[0]!r}: it is sharded (FSDP2 DTensor); load the "
                             "adapter before fully_shard")
        ckpt.validate_state(tensors, expected, path, optional)  # everything checked before anything is assigned
        meth.load(tensors)
        own = set(meth.tensors())
        with torch.no_grad():
            for k, p in expected.items():
                if k not in own:  # modules_to_save copies
                    p.copy_(tensors[k])

    def __repr__(self) -> str:
        return f"PeftModel(adapters={list(self.peft_config)}, active={self._active})\n{self.base_model.model!r}"

    def _get_name(self) -> str:
        """The wrapped model's name. HF ``Trainer`` reads ``model._get_name()`` (for Hugging Face PEFT
        models, the wrapped model's) to decide whether label smoothing shifts the labels as for a
        causal LM; ``repr`` above does not use it."""
        return self.base_model.model._get_name()


def _new_instance(cls, *args):
    """Unpickling: ``cls.__new__`` (``copyreg.__newobj__`` for a class other than the pickled one)."""
    return cls.__new__(cls, *args)


def _forward_with_signature(impl, sig: inspect.Signature):
    def forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    forward.__signature__ = sig
    forward.__doc__ = impl.__doc__
    forward.__qualname__ = impl.__qualname__
    return forward


def _with_adapter_names(sig: inspect.Signature) -> List[inspect.Parameter]:
    """``sig``'s parameters with a keyword-only ``adapter_names=None`` before any ``**kwargs``
    (unless it has one already)."""
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        at = next((i for i, q in enumerate(params) if q.kind is q.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    return params


_SIGNATURE_CLASSES: Dict[Tuple[type, type], Optional[type]] = {}


def _signature_class(public: type, wrapped: type) -> Optional[type]:
    """The subclass of ``public`` whose ``forward`` has ``wrapped.forward``'s signature (plus
    ``adapter_names``), cached per pair; None where that signature cannot be read."""
    key = (public, wrapped)
    if key not in _SIGNATURE_CLASSES:
        cls = None
        try:
            sig = inspect.signature(wrapped.forward)
            params = list(sig.parameters.values())
            if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
                sig = sig.replace(parameters=_with_adapter_names(sig))
                name = public.__name__
                if "QuestionAnswering" in wrapped.__name__ and "QuestionAnswering" not in name:
                    name += "ForQuestionAnswering"
                cls = type(name, (public,), {
                    "forward": _forward_with_signature(public.forward, sig), "__module__": public.__module__,
                    "__qualname__": public.__qualname__, "__doc__": public.__doc__,
                    "_fastpeft_public_class": public})
        except (TypeError, ValueError):  # no inspectable forward (e.g. a builtin): keep the class
            cls = None
        _SIGNATURE_CLASSES[key] = cls
    return _SIGNATURE_CLASSES[key]


def _output_requires_grad(module, args, output):
    """Forward hook of :meth:`PeftModel.enable_input_require_grads` (module level: models pickle)."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _requiring_grad(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_(True)  # an alias: the caller's tensor keeps its flag
    return t


def _float_inputs_require_grad(module, args, kwargs):
    """Forward pre-hook of :meth:`PeftModel.enable_input_require_grads` for models without input
    word embeddings: floating-point inputs require grad."""
    if not torch.is_grad_enabled():
        return None
    return tuple(_requiring_grad(a) for a in args), {k: _requiring_grad(v) for k, v in kwargs.items()}


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (``DTensor``: a collective), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def _read_checkpoint(model_id: str):
    """Read and validate the config and the weights file before touching any model."""
    d, cfg_path = ckpt.read_config(model_id)
    config = config_from_dict(d, cfg_path)
    tensors, w_path = ckpt.read_weights(model_id)
    return config, tensors, w_path


def get_peft_model(model: nn.Module, config: _Config, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and inject the method ``config`` describes; ``-> PeftModel``. ``config``
    itself is not modified (the model keeps its own filled-in copy in ``peft_config``)."""
    pm = PeftModel(model, config, adapter_name)
    object.__setattr__(pm, "_init_journal", None)
    return pm
