"""Model-level API: ``get_peft_model(model, config)`` -> :class:`PeftModel`.

One wrapper for every method. The parameter layout mirrors Hugging Face PEFT
(``base_model.model.<path>``, ``prompt_encoder.<name>.embedding.weight``), so checkpoints
written by ``save_pretrained`` use PEFT's key names and load into ``peft.PeftModel`` and back.

Where each method goes:

* LoRA: every targeted ``nn.Linear`` becomes a :class:`fastpeft.LoRALinear` (fused op).
* Adapters (Houlsby / Pfeiffer / AdaptFormer): transformer blocks are recognised by their
  module names (fastpeft's ViT and BERT, Hugging Face BERT, ViT and LLaMA layers); a
  sequential :class:`fastpeft.Adapter` wraps the attention / FFN output projection, a
  :class:`fastpeft.ParallelAdapter` reads the block's residual stream beside the MLP.
* BitFit: all biases (LayerNorm beta included) except the output head's become trainable.
* Prompt tuning (:class:`fastpeft.PromptTuning`) and prefix tuning (:class:`fastpeft.PrefixEncoder`)
  on Hugging Face models are fed as PEFT feeds them (prompts concatenated to ``inputs_embeds``,
  ones prepended to the attention mask, -100 to causal-LM labels; prefixes as a
  ``DynamicCache`` of ``past_key_values``). On fastpeft's ViT / BERT prefixes go through the
  models' ``prefix_kv`` argument (fused prefix attention, one prefix shared by the batch).
* VPT (:class:`fastpeft.VPT`, shallow or deep) on fastpeft's ViT.

Checkpoints are validated completely before anything is assigned; a failed load undoes the
injection (a journal of every module swap and ``requires_grad`` change), so the model is left
exactly as it was.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from fastpeft import checkpoint as ckpt
from fastpeft.config import (AdapterConfig, BitFitConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                             VPTConfig, _Config, config_from_dict)
from fastpeft.modules.lora import LoRALinear

__all__ = ["get_peft_model", "PeftModel", "AdapterLayer", "ParallelAdapterSlot", "BertParallelOutput",
           "ParallelMLP"]

_HEAD_NAMES = ("head", "lm_head", "classifier", "score")


# ---------------------------------------------------------------------------------------------
# a journal of changes to the base model, so a failed injection / load can be undone exactly
# ---------------------------------------------------------------------------------------------
class _Journal:
    def __init__(self):
        self._undo: List[Callable[[], None]] = []

    def set_module(self, parent: nn.Module, attr: str, new: Optional[nn.Module]) -> None:
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._undo.append(lambda: setattr(parent, attr, old))

    def requires_grad(self, p: nn.Parameter, flag: bool) -> None:
        old = p.requires_grad
        p.requires_grad_(flag)
        self._undo.append(lambda: p.requires_grad_(old))

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _parent(model: nn.Module, path: str) -> Tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return _get(model, parent), attr


# ---------------------------------------------------------------------------------------------
# adapter sites
# ---------------------------------------------------------------------------------------------
class _AdapterSlot(nn.Module):
    """Named adapters at one site; only the active one runs (none while disabled)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False

    def _active(self) -> Optional[nn.Module]:
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.adapters:
            return None
        return self.adapters[name]


class AdapterLayer(_AdapterSlot):
    """``adapter(base_layer(x))``: a sequential (Houlsby / Pfeiffer) adapter after a projection."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, *args, **kwargs):
        y = self.base_layer(*args, **kwargs)
        ad = self._active()
        return y if ad is None else ad(y)


class ParallelAdapterSlot(_AdapterSlot):
    """Fills fastpeft ViT's ``Block.parallel_adapter``: ``residual + s·f(x)`` (AdaptFormer)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        ad = self._active()
        return residual if ad is None else ad(x, residual=residual)


class BertParallelOutput(_AdapterSlot):
    """Replaces a post-norm BERT ``output`` (dense, dropout, LayerNorm): the parallel adapter
    reads the FFN's residual input: ``LN(drop(dense(h)) + x + s·f(x))``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ad = self._active()
        if ad is None:
            return self.base_layer(hidden_states, input_tensor, *args, **kwargs)
        b = self.base_layer
        h = b.dropout(b.dense(hidden_states))
        return b.LayerNorm(ad(input_tensor, residual=h + input_tensor))


class _CaptureInput(nn.Module):
    """Wraps a pre-MLP norm and hands its input (the residual stream) to a :class:`ParallelMLP`."""

    def __init__(self, base_layer: nn.Module, sink: "ParallelMLP"):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_sink", sink)  # not a submodule: it lives in its own place

    def forward(self, x, *args, **kwargs):
        self._sink._x = x
        return self.base_layer(x, *args, **kwargs)


class ParallelMLP(_AdapterSlot):
    """Replaces a pre-norm block's ``mlp`` (HF ViT, LLaMA): ``mlp(norm(x)) + s·f(x)`` where ``x``
    (the residual stream) is captured from the norm in front of it. The block adds ``x``. (HF ViT
    applies its hidden dropout after the MLP, so in training it also drops the adapter branch;
    its default hidden_dropout_prob is 0.)"""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._x: Optional[torch.Tensor] = None

    def forward(self, h, *args, **kwargs):
        y = self.base_layer(h, *args, **kwargs)
        x, self._x = self._x, None
        ad = self._active()
        if ad is None:
            return y
        if x is None or x.shape != h.shape:
            raise RuntimeError("ParallelMLP: the residual stream was not captured from the norm before the MLP")
        return ad(x, residual=y)


def _block_sites(model: nn.Module) -> List[dict]:
    """Recognise transformer blocks by module names; ``-> [{attn_out, ffn_out, parallel..., dim}]``."""
    sites = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""

        def has(path: str) -> bool:
            try:
                m.get_submodule(path)
                return True
            except AttributeError:
                return False

        def lin(path: str) -> nn.Module:
            return m.get_submodule(path)

        if has("attn.proj") and has("mlp.fc2") and hasattr(m, "parallel_adapter"):  # fastpeft ViT
            sites.append(dict(attn_out=p + "attn.proj", ffn_out=p + "mlp.fc2", parallel=("slot", p + "parallel_adapter"),
                              dim=_out_features(lin("mlp.fc2"))))
        elif has("attention.output.dense") and has("output.dense") and has("intermediate"):  # BERT
            sites.append(dict(attn_out=p + "attention.output.dense", ffn_out=p + "output.dense",
                              parallel=("bert_output", p + "output"), dim=_out_features(lin("output.dense"))))
        elif has("attention.o_proj") and has("mlp.fc2") and has("layernorm_after"):  # HF ViT (transformers 5)
            sites.append(dict(attn_out=p + "attention.o_proj", ffn_out=p + "mlp.fc2",
                              parallel=("prenorm", p + "layernorm_after", p + "mlp"), dim=_out_features(lin("mlp.fc2"))))
        elif has("self_attn.o_proj") and has("mlp.down_proj") and has("post_attention_layernorm"):  # LLaMA
            sites.append(dict(attn_out=p + "self_attn.o_proj", ffn_out=p + "mlp.down_proj",
                              parallel=("prenorm", p + "post_attention_layernorm", p + "mlp"),
                              dim=_out_features(lin("mlp.down_proj"))))
    return sites


def _out_features(m: nn.Module) -> int:
    while isinstance(m, (AdapterLayer, LoRALinear)):
        m = m.base_layer
    return m.out_features


# ---------------------------------------------------------------------------------------------
# prompt encoders
# ---------------------------------------------------------------------------------------------
def _prompt_table(enc: nn.Module) -> torch.Tensor:
    """What PEFT saves as ``prompt_embeddings``: the prompt rows ``(P, D)``, or the (projected)
    prefix table ``(P, num_layers·2·W)``."""
    from fastpeft.modules.prefix import PrefixEncoder
    return enc.table()[0] if isinstance(enc, PrefixEncoder) else enc.embedding.weight


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings") and \
        not isinstance(getattr(model, "config"), _Config) and hasattr(model.config, "to_dict")


def _is_fastpeft_vit(model: nn.Module) -> bool:
    from fastpeft.models.vit import ViT
    return isinstance(model, ViT)


def _is_fastpeft_bert(model: nn.Module) -> bool:
    from fastpeft.models.bert import BertForSequenceClassification, BertModel
    return isinstance(model, (BertModel, BertForSequenceClassification))


def _input_embeddings(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    for n, m in model.named_modules():
        if n == "embeddings.word_embeddings" or n.endswith(".embeddings.word_embeddings"):
            return m
    raise ValueError(f"{type(model).__name__}: found no input word embeddings for prompt tuning")


# ---------------------------------------------------------------------------------------------
# target selection
# ---------------------------------------------------------------------------------------------
def _head_paths(model: nn.Module) -> List[str]:
    """Names of the output head(s): excluded from "all-linear" and from BitFit."""
    heads = []
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            out_emb = None
    for name, m in model.named_modules():
        if not name:
            continue
        if (out_emb is not None and m is out_emb) or name.rpartition(".")[2] in _HEAD_NAMES:
            if not any(name.startswith(h + ".") for h in heads):
                heads.append(name)
    if not heads and not _is_hf(model):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        if linears:
            heads.append(linears[-1])
    return heads


def _under(name: str, roots: List[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _lora_targets(model: nn.Module, config: LoraConfig) -> List[str]:
    tm = config.target_modules
    # names inside an existing fastpeft module (its base_layer, lora_A...) are never targets themselves
    inner = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, _AdapterSlot)) and n]
    names = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(i + ".") for i in inner)]
    if tm is None:
        present = {n.rpartition(".")[2] for n, _ in names}
        for cand in (["q_proj", "v_proj"], ["query", "value"], ["qkv"], ["c_attn"]):
            if all(c in present for c in cand):
                tm = cand
                break
        else:
            raise ValueError("target_modules: no default for this model; pass a list of module names, a regex "
                             "or 'all-linear'")
    if tm == "all-linear":
        heads = _head_paths(model)
        out = [n for n, m in names if isinstance(m, (nn.Linear, LoRALinear)) and not _under(n, heads)]
    elif isinstance(tm, str):
        out = [n for n, _ in names if re.fullmatch(tm, n)]
    else:
        out = [n for n, _ in names if any(n == t or n.endswith("." + t) for t in tm)]
    if not out:
        raise ValueError(f"target_modules: {tm!r} matched no module of {type(model).__name__}")
    for n in out:
        m = _get(model, n)
        if not isinstance(m, (nn.Linear, LoRALinear)):
            raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}; fastpeft's LoRA adapts nn.Linear only")
    return out


# ---------------------------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------------------------
class _BaseModel(nn.Module):
    """Holds the user's model as ``.model`` so parameter names read ``base_model.model.<path>``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with one or more fastpeft adapters. Build it with :func:`get_peft_model` or
    :meth:`from_pretrained`; call it like the model it wraps."""

    def __init__(self, model: nn.Module, config: _Config, adapter_name: str = "default"):
        super().__init__()
        self.base_model = _BaseModel(model)
        self.peft_config: Dict[str, _Config] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._bitfit: Dict[str, List[str]] = {}
        self._bitfit_orig: Dict[str, torch.Tensor] = {}
        self._prompts_disabled = False
        journal = _Journal()
        try:
            for p in model.parameters():
                journal.requires_grad(p, False)
            self._inject(adapter_name, config, journal)
        except Exception:
            journal.rollback()
            raise
        # kept until construction is confirmed (from_pretrained undoes it when the weights do not fit)
        object.__setattr__(self, "_init_journal", journal)
        self.set_adapter(adapter_name)

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
            if name in ("base_model", "peft_config", "prompt_encoder"):
                raise
            return getattr(self.base_model.model, name)

    @property
    def active_peft_config(self) -> _Config:
        return self.peft_config[self.active_adapter]

    # ---- injection --------------------------------------------------------------------------
    def _inject(self, name: str, config: _Config, journal: _Journal) -> None:
        if not isinstance(config, _Config):
            raise ValueError(f"config: expected a fastpeft config (LoraConfig, AdapterConfig, ...), "
                             f"got {type(config).__name__}")
        if name in self.peft_config:
            raise ValueError(f"adapter_name: {name!r} already exists ({list(self.peft_config)})")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter_name: expected a non-empty str without '.', got {name!r}")
        prompt_names = [n for n, c in self.peft_config.items() if c.is_prompt_learning]
        if config.is_prompt_learning and self.peft_config and type(config) is not type(next(iter(self.peft_config.values()))):
            raise ValueError("config: prompt-learning adapters cannot be mixed with other methods in one model")
        if prompt_names and not config.is_prompt_learning:
            raise ValueError("config: prompt-learning adapters cannot be mixed with other methods in one model")
        model = self.base_model.model
        if isinstance(config, LoraConfig):
            config = _with_seq_cls_head(model, config)
            self._inject_lora(model, name, config, journal)
        elif isinstance(config, AdapterConfig):
            self._inject_adapter(model, name, config, journal)
        elif isinstance(config, BitFitConfig):
            self._inject_bitfit(model, name, journal)
        elif isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
            config = self._fill_prompt_config(model, config)
            self._inject_prompt(model, name, config, journal)
        elif isinstance(config, VPTConfig):
            self._inject_vpt(model, name, config, journal)
        else:
            raise ValueError(f"config: unsupported config type {type(config).__name__}")
        mts = getattr(config, "modules_to_save", None) or []
        roots = _modules_to_save(model, mts)
        if mts and not roots:
            # PEFT lists both "classifier" and "score" for SEQ_CLS: names that match nothing are
            # skipped as PEFT does, but a list that matches nothing at all is a mistake
            raise ValueError(f"modules_to_save: {mts!r} matched no module of {type(model).__name__}")
        for r in roots:
            for p in _get(model, r).parameters():
                journal.requires_grad(p, True)
        self.peft_config[name] = config
        journal.on_undo(lambda: self.peft_config.pop(name, None))

    def _inject_lora(self, model, name, config: LoraConfig, journal) -> None:
        targets = _lora_targets(model, config)
        for path in targets:
            m = _get(model, path)
            if isinstance(m, LoRALinear):
                m.update_layer(name, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                               config.init_lora_weights)
                journal.on_undo(lambda m=m: m.delete_adapter(name))
            else:
                parent, attr = _parent(model, path)
                new = LoRALinear(m, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                                 config.init_lora_weights, adapter_name=name)
                new.active_adapter = self.active_adapter
                journal.set_module(parent, attr, new)
            layer = _get(model, path)
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                journal.requires_grad(layer.base_layer.bias, True)
        if config.bias == "all":
            for pn, p in model.named_parameters():
                if pn.endswith("bias"):
                    journal.requires_grad(p, True)
        if config.target_modules == "all-linear":
            # save the resolved layer names: PEFT's own "all-linear" rule differs for some heads
            config._resolved_targets = targets

    def _inject_adapter(self, model, name, config: AdapterConfig, journal) -> None:
        from fastpeft.modules.adapter import ADAPTER_PLACEMENTS, Adapter, ParallelAdapter

        sites = _block_sites(model)
        if not sites:
            raise ValueError(f"AdapterConfig: found no transformer blocks in {type(model).__name__} (supported: "
                             "fastpeft ViT/BERT, Hugging Face BERT, ViT and LLaMA layers)")
        kw = dict(activation=config.activation, scaling=config.module_scaling(), dropout=config.dropout,
                  init=config.init)
        for site in sites:
            for where in ADAPTER_PLACEMENTS[config.placement]:
                if where in ("attn_out", "ffn_out"):
                    path = site[where]
                    m = _get(model, path)
                    if not isinstance(m, AdapterLayer):
                        parent, attr = _parent(model, path)
                        m = AdapterLayer(m)
                        journal.set_module(parent, attr, m)
                    d = _out_features(m.base_layer)
                    w = _first_param(m.base_layer)
                    ad = Adapter(d, config.bottleneck_for(d), device=w.device, dtype=w.dtype, **kw)
                else:
                    kind, *paths = site["parallel"]
                    d = site["dim"]
                    if kind == "slot":
                        blk, attr = _parent(model, paths[0])
                        m = getattr(blk, attr)
                        if not isinstance(m, ParallelAdapterSlot):
                            if m is not None:
                                raise ValueError(f"{paths[0]}: already holds a {type(m).__name__}")
                            m = ParallelAdapterSlot()
                            journal.set_module(blk, attr, m)
                    elif kind == "bert_output":
                        m = _get(model, paths[0])
                        if not isinstance(m, BertParallelOutput):
                            parent, attr = _parent(model, paths[0])
                            m = BertParallelOutput(m)
                            journal.set_module(parent, attr, m)
                    else:  # prenorm: capture the norm's input, run the adapter beside the MLP
                        norm_path, mlp_path = paths
                        m = _get(model, mlp_path)
                        if not isinstance(m, ParallelMLP):
                            parent, attr = _parent(model, mlp_path)
                            m = ParallelMLP(m)
                            journal.set_module(parent, attr, m)
                            nparent, nattr = _parent(model, norm_path)
                            journal.set_module(nparent, nattr, _CaptureInput(_get(model, norm_path), m))
                    w = _first_param(self.base_model.model)
                    ad = ParallelAdapter(d, config.bottleneck_for(d), device=w.device, dtype=w.dtype, **kw)
                m.adapters[name] = ad
                m.active_adapter = self.active_adapter
                journal.on_undo(lambda m=m: m.adapters.pop(name))

    def _inject_bitfit(self, model, name, journal) -> None:
        if self._bitfit:
            raise ValueError("BitFitConfig: a model holds one BitFit adapter (biases are trained in place)")
        heads = _head_paths(model)
        names = [pn for pn, p in model.named_parameters()
                 if pn.rpartition(".")[2] == "bias" and not _under(pn.rpartition(".")[0], heads)]
        if not names:
            raise ValueError(f"BitFitConfig: {type(model).__name__} has no bias parameters")
        params = dict(model.named_parameters())
        for pn in names:
            journal.requires_grad(params[pn], True)
            # the pre-training values, so ``disable_adapter()`` can show the base model
            self._bitfit_orig[pn] = params[pn].detach().clone()
        self._bitfit[name] = names
        journal.on_undo(lambda: (self._bitfit.clear(), self._bitfit_orig.clear()))

    @staticmethod
    def _fill_prompt_config(model, config):
        """Model dimensions PEFT fills in (num_layers, token_dim, heads, task_type)."""
        if _is_fastpeft_vit(model):
            c = model.config
            if isinstance(config, PromptTuningConfig):
                raise ValueError("PromptTuningConfig: for fastpeft's ViT use VPTConfig (prompt tokens after [CLS])")
            fill = dict(num_layers=len(model.blocks), token_dim=c.dim, num_attention_heads=c.heads)
        elif _is_fastpeft_bert(model):
            c = model.config
            fill = dict(num_layers=c.num_hidden_layers, token_dim=c.hidden_size, num_attention_heads=c.num_attention_heads)
        elif _is_hf(model):
            fill = _hf_prompt_dims(model, config)
        else:
            raise ValueError(f"{type(config).__name__}: needs a Hugging Face transformers model or fastpeft's ViT / BERT, "
                             f"got {type(model).__name__}")
        import dataclasses
        fill["num_transformer_submodules"] = 1  # encoder-only / decoder-only models, as PEFT fills it
        config = dataclasses.replace(config, **{k: v for k, v in fill.items() if getattr(config, k) is None})
        if config.task_type is None and _is_hf(model):
            config.task_type = _hf_task_type(model)
        return _with_seq_cls_head(model, config)

    def _inject_prompt(self, model, name, config, journal):
        w = _first_param(model)
        if isinstance(config, PromptTuningConfig):
            from fastpeft.modules.prompt import PromptTuning
            enc = PromptTuning(config.num_virtual_tokens, config.token_dim).to(device=w.device, dtype=w.dtype)
        else:
            from fastpeft.modules.prefix import PrefixEncoder
            # a PEFT checkpoint in inference mode holds the projected table: no projection MLP then
            projection = config.prefix_projection and not config.inference_mode
            H = config.num_attention_heads
            enc = PrefixEncoder(config.num_layers, H, config.token_dim // H, config.num_virtual_tokens, projection,
                                encoder_hidden_size=config.encoder_hidden_size or config.token_dim,
                                token_dim=config.token_dim, device=w.device, dtype=w.dtype)
        self.prompt_encoder[name] = enc
        journal.on_undo(lambda: self.prompt_encoder.pop(name))

    def _inject_vpt(self, model, name, config: VPTConfig, journal) -> None:
        from fastpeft.modules.vpt import VPT

        if not _is_fastpeft_vit(model):
            raise ValueError(f"VPTConfig: needs fastpeft's ViT (fastpeft.models.ViT), got {type(model).__name__}")
        n_prefix = model.num_prefix_tokens
        journal.on_undo(lambda: setattr(model, "num_prefix_tokens", n_prefix))
        enc = VPT(model, config.num_prompts, deep=config.deep, dropout=config.dropout, train_head=False)
        # the ViT lives in base_model.model: keep a plain reference so it is not registered twice
        enc._modules.pop("vit")
        object.__setattr__(enc, "vit", model)
        model.num_prefix_tokens = n_prefix  # VPT raises it only while its prompts are in the sequence
        self.prompt_encoder[name] = enc
        journal.on_undo(lambda: self.prompt_encoder.pop(name))

    # ---- adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: _Config) -> None:
        """Add another adapter (not active until :meth:`set_adapter`). On error nothing changes."""
        journal = _Journal()
        try:
            self._inject(adapter_name, config, journal)
        except Exception:
            journal.rollback()
            raise
        self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs (and trains: the others' weights are frozen)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(self.peft_config)}")
        self.active_adapter = adapter_name
        for m in self.base_model.model.modules():
            if isinstance(m, LoRALinear):
                m.active_adapter = adapter_name
                for n in m.lora_A:
                    m.lora_A[n].requires_grad_(n == adapter_name)
                    m.lora_B[n].requires_grad_(n == adapter_name)
            elif isinstance(m, _AdapterSlot):
                m.active_adapter = adapter_name
                for n, ad in m.adapters.items():
                    ad.requires_grad_(n == adapter_name)
        for n, enc in self.prompt_encoder.items():
            enc.requires_grad_(n == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(self.peft_config)}")
        if isinstance(self.peft_config[adapter_name], BitFitConfig):
            raise ValueError("delete_adapter: BitFit trains biases in place and cannot be deleted")
        for m in self.base_model.model.modules():
            if isinstance(m, LoRALinear) and adapter_name in m.lora_A:
                m.delete_adapter(adapter_name)
            elif isinstance(m, _AdapterSlot) and adapter_name in m.adapters:
                m.adapters.pop(adapter_name)
        if adapter_name in self.prompt_encoder:
            self.prompt_encoder.pop(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the base model (LoRA merged in must be unmerged first)."""
        model = self.base_model.model
        if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
            raise RuntimeError("disable_adapter: LoRA weights are merged into the base; unmerge() first")
        touched = [m for m in model.modules() if isinstance(m, (LoRALinear, _AdapterSlot))]
        params = dict(model.named_parameters())
        saved = {pn: params[pn].detach().clone() for pn in self._bitfit_orig}
        for m in touched:
            m.disable_adapters = True
        self._prompts_disabled = True
        with torch.no_grad():
            for pn, v in self._bitfit_orig.items():
                params[pn].copy_(v)
        try:
            yield
        finally:
            for m in touched:
                m.disable_adapters = False
            self._prompts_disabled = False
            with torch.no_grad():
                for pn, v in saved.items():
                    params[pn].copy_(v)

    # ---- merging ----------------------------------------------------------------------------
    def _lora_layers(self) -> List[Tuple[str, LoRALinear]]:
        return [(n, m) for n, m in self.base_model.model.named_modules() if isinstance(m, LoRALinear)]

    def merge_adapter(self, adapter_names: Optional[List[str]] = None) -> None:
        """Fold LoRA adapters (default: the active one) into the base weights, in place."""
        for _, m in self._lora_layers():
            names = [n for n in (adapter_names or [self.active_adapter]) if n in m.lora_A]
            m.merge(names)

    def unmerge(self) -> None:
        """Undo :meth:`merge_adapter`, restoring the base weights bit for bit."""
        for _, m in self._lora_layers():
            m.unmerge()

    unmerge_adapter = unmerge

    def _check_mergeable(self) -> None:
        bad = [n for n, c in self.peft_config.items() if not isinstance(c, (LoraConfig, BitFitConfig))]
        if bad:
            raise ValueError(f"merge_and_unload: adapters {bad} ({type(self.peft_config[bad[0]]).__name__}) "
                             "cannot be folded into the base weights; only LoRA (and BitFit) can")

    def merge_and_unload(self, adapter_names: Optional[List[str]] = None) -> nn.Module:
        """Merge LoRA into the base weights and return the plain model (LoRALinear -> nn.Linear)."""
        self._check_mergeable()
        self.merge_adapter(adapter_names)
        return self._unload()

    def unload(self) -> nn.Module:
        """Return the plain model without merging (drops the LoRA layers)."""
        self._check_mergeable()
        self.unmerge()
        return self._unload()

    def _unload(self) -> nn.Module:
        model = self.base_model.model
        for path, m in self._lora_layers():
            parent, attr = _parent(model, path)
            setattr(parent, attr, m.base_layer)
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

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        cfg = self.peft_config[self.active_adapter]
        if not cfg.is_prompt_learning or self._prompts_disabled:
            return self.base_model.model(*args, **kwargs)
        model = self.base_model.model
        enc = self.prompt_encoder[self.active_adapter]
        if isinstance(cfg, VPTConfig):
            return _vpt_forward(model, enc, *args, **kwargs)
        if isinstance(cfg, PrefixTuningConfig) and (_is_fastpeft_vit(model) or _is_fastpeft_bert(model)):
            return _native_prefix_forward(model, enc, cfg, *args, **kwargs)
        return _hf_prompt_forward(model, enc, cfg, *args, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------
    def _adapter_tensors(self, name: str) -> Dict[str, torch.Tensor]:
        """PEFT-named tensors of adapter ``name`` (live parameters, or computed prompts)."""
        cfg = self.peft_config[name]
        model = self.base_model.model
        # PEFT wraps tuner methods as base_model (LoraModel).model, prompt methods as base_model
        pre = "base_model." if cfg.is_prompt_learning else "base_model.model."
        out: Dict[str, torch.Tensor] = {}
        if isinstance(cfg, VPTConfig):
            out["prompt_embeddings"] = self.prompt_encoder[name].prompt_embeddings
        elif cfg.is_prompt_learning:
            out["prompt_embeddings"] = _prompt_table(self.prompt_encoder[name])
        elif isinstance(cfg, LoraConfig):
            for path, m in self._lora_layers():
                if name in m.lora_A:
                    out[f"{pre}{path}.lora_A.weight"] = m.lora_A[name].weight
                    out[f"{pre}{path}.lora_B.weight"] = m.lora_B[name].weight
                    if cfg.bias == "lora_only" and m.base_layer.bias is not None:
                        out[f"{pre}{path}.base_layer.bias"] = m.base_layer.bias
            if cfg.bias == "all":
                out.update({pre + pn: p for pn, p in model.named_parameters() if pn.endswith("bias")})
        elif isinstance(cfg, AdapterConfig):
            for path, m in model.named_modules():
                if isinstance(m, _AdapterSlot) and name in m.adapters:
                    for pn, p in m.adapters[name].named_parameters():
                        out[f"{pre}{path}.adapters.{pn}"] = p
        elif isinstance(cfg, BitFitConfig):
            params = dict(model.named_parameters())
            out.update({pre + pn: params[pn] for pn in self._bitfit[name]})
        for r in _modules_to_save(model, getattr(cfg, "modules_to_save", None) or []):
            out.update({f"{pre}{r}.{pn}": p for pn, p in _get(model, r).named_parameters()})
        return out

    def _config_dict(self, name: str) -> dict:
        cfg = self.peft_config[name]
        d = cfg.to_dict()
        if isinstance(cfg, LoraConfig) and getattr(cfg, "_resolved_targets", None) is not None:
            d["target_modules"] = list(cfg._resolved_targets)
        if isinstance(cfg, PrefixTuningConfig):
            # the checkpoint holds the projected prefixes: readers must not re-project them
            d["inference_mode"] = True
        return d

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[List[str]] = None) -> None:
        """Write each adapter in PEFT's layout: ``default`` in ``save_directory``, others in
        ``save_directory/<name>``: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        import os
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise ValueError(f"selected_adapters: {name!r} not in {list(self.peft_config)}")
            d = save_directory if name == "default" else os.path.join(save_directory, name)
            with torch.no_grad():
                tensors = self._adapter_tensors(name)
            ckpt.write_checkpoint(d, self._config_dict(name), tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Load a fastpeft- or PEFT-saved adapter onto ``model``. A bad checkpoint raises (naming
        the file and key) and leaves ``model`` exactly as it was."""
        config, cfg_path, tensors, w_path = _read_checkpoint(model_id)
        pm = cls(model, config, adapter_name)  # injects; rolled back below if the weights do not fit
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
        """Load another adapter from a checkpoint into this model (not activated)."""
        config, _, tensors, w_path = _read_checkpoint(model_id)
        journal = _Journal()
        try:
            self._inject(adapter_name, config, journal)
            self._load_tensors(adapter_name, tensors, w_path)
        except Exception:
            journal.rollback()
            raise
        self.set_adapter(self.active_adapter)
        if not is_trainable:
            for t in self._adapter_tensors(adapter_name).values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(False)

    def _load_tensors(self, name: str, tensors: Dict[str, torch.Tensor], path: str) -> None:
        cfg = self.peft_config[name]
        with torch.no_grad():
            expected = self._adapter_tensors(name)
        ckpt.validate_state(tensors, expected, path)  # everything checked before anything is assigned
        with torch.no_grad():
            if cfg.is_prompt_learning and not isinstance(cfg, VPTConfig):
                enc = self.prompt_encoder[name]
                t = tensors["prompt_embeddings"]
                if getattr(enc, "prefix_projection", False):
                    enc.fold()  # the file holds projected prefixes: they become the plain table
                enc.embedding.weight.copy_(t)
            for k, p in expected.items():
                if isinstance(p, nn.Parameter):  # computed prompts were handled above
                    p.copy_(tensors[k])

    def __repr__(self) -> str:
        return f"PeftModel(adapters={list(self.peft_config)}, active={self.active_adapter!r})\n{self.base_model.model!r}"


def _with_seq_cls_head(model: nn.Module, config: _Config) -> _Config:
    """As PEFT's PeftModelForSequenceClassification: with task_type "SEQ_CLS" the classifier head
    ("classifier" / "score") is trained and saved too. Returns a copy; the user's config is kept."""
    if getattr(config, "task_type", None) != "SEQ_CLS":
        return config
    import dataclasses
    present = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    mts = list(config.modules_to_save or [])
    extra = [h for h in ("classifier", "score") if h in present and h not in mts]
    return dataclasses.replace(config, modules_to_save=mts + extra) if extra else config


def _modules_to_save(model: nn.Module, names: List[str]) -> List[str]:
    return [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in names)]


def _first_param(m: nn.Module) -> torch.Tensor:
    for p in m.parameters():
        return p
    return torch.empty(0)


def _read_checkpoint(model_id: str):
    """Read and validate the config and the weights file before touching any model."""
    d, cfg_path = ckpt.read_config(model_id)
    config = config_from_dict(d, cfg_path)
    tensors, w_path = ckpt.read_weights(model_id)
    return config, cfg_path, tensors, w_path


def get_peft_model(model: nn.Module, config: _Config, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and inject the method ``config`` describes; ``-> PeftModel``."""
    pm = PeftModel(model, config, adapter_name)
    object.__setattr__(pm, "_init_journal", None)
    return pm


# ---------------------------------------------------------------------------------------------
# prompt-learning forwards
# ---------------------------------------------------------------------------------------------
def _hf_text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def _hf_prompt_dims(model, config) -> dict:
    c = _hf_text_config(model)
    heads = c.num_attention_heads
    token_dim = c.hidden_size
    if isinstance(config, PrefixTuningConfig) and getattr(c, "num_key_value_heads", None):
        # grouped-query attention: prefixes are keys/values, so they have the kv heads' width
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        heads = c.num_key_value_heads
        token_dim = head_dim * heads
    return dict(num_layers=c.num_hidden_layers, token_dim=token_dim, num_attention_heads=heads)


def _hf_task_type(model) -> str:
    n = type(model).__name__
    if n.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if n.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if n.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def _hf_prompt_forward(model, enc, cfg, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                       **kwargs):
    """As ``peft.PeftModelFor*.forward`` does for prompt / prefix tuning."""
    B = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
    P = cfg.num_virtual_tokens
    if attention_mask is not None:
        prefix_mask = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None  # PEFT drops them: they would not cover the virtual tokens
    if labels is not None:
        kwargs["labels"] = labels
    if isinstance(cfg, PrefixTuningConfig):
        from transformers import DynamicCache
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + P
        dt = _first_param(model).dtype
        # fastpeft.PrefixEncoder reads the table as PEFT does: layer i's keys slot 2i, values 2i+1
        layers = [(k.to(dt), v.to(dt)) for k, v in enc(batch_size=B)]
        cache = DynamicCache(layers, config=_hf_text_config(model))
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     past_key_values=cache, **kwargs)
    kwargs.pop("position_ids", None)
    if inputs_embeds is None:
        inputs_embeds = _input_embeddings(model)(input_ids)
    if labels is not None and cfg.task_type == "CAUSAL_LM":
        kwargs["labels"] = torch.cat([torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels], 1)
    prompts = enc(B).to(inputs_embeds.dtype)
    return model(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1), attention_mask=attention_mask, **kwargs)


def _native_prefix_forward(model, enc, cfg, *args, **kwargs):
    """Prefix tuning on fastpeft's ViT / BERT: one (1, heads, P, head_dim) key/value prefix per
    layer, shared by the whole batch (never expanded), through the fused prefix attention
    (prefixes are always visible, so the attention mask needs no extension)."""
    dt = _first_param(model).dtype
    kwargs["prefix_kv"] = [(k.to(dt), v.to(dt)) for k, v in enc()]  # Bp = 1
    return model(*args, **kwargs)


def _vpt_forward(model, vpt, images):
    """VPT through ``fastpeft.VPT`` (fast deep path = prompts as attention prefixes); the ViT's
    ``num_prefix_tokens`` is raised only while the prompts are in the token sequence."""
    old = model.num_prefix_tokens
    model.num_prefix_tokens = vpt.num_prefix_tokens
    try:
        return vpt(images)
    finally:
        model.num_prefix_tokens = old
