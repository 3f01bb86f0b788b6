"""How prompt-learning methods feed a model (shared by prompt tuning, prefix tuning and VPT).

* Hugging Face text models, as PEFT's forward feeds them: prompts concatenated to
  ``inputs_embeds`` (ones prepended to the attention mask, -100 to causal-LM labels), prefixes
  as a ``DynamicCache`` of per-layer keys/values.
* ``generate`` with the same model inputs the forward sees, decoded with the KV cache: the
  prompt / prefix positions are represented by ``P`` placeholder ids that HF's generation loop
  treats as already consumed (prompt tuning: their embeddings are the prompts; prefix tuning:
  they are the cache), and position ids are the forward's (``0 ..`` / ``P ..``, padding not
  skipped), so greedy ``generate`` equals greedy decoding through the forward. The placeholders
  are removed from the returned sequences.
* Per-sample adapters (``adapter_names=[...]``) of different ``num_virtual_tokens``, and
  ``"__base__"`` rows (no virtual tokens), on Hugging Face text models: every row gets
  ``P = max`` virtual slots, its own ``P_i`` first and ``P - P_i`` padding slots after them with
  attention mask 0 (prompts: ``[prompts_i ; padding ; tokens]``; prefixes: padded cache entries),
  and explicit position ids that continue from ``P_i`` as each adapter alone would (the tokens
  at ``P_i + j``, prompts at ``0 .. P_i - 1``), so each row's outputs equal its adapter run alone
  (prompt tuning: at the same positions, the padding slots' outputs being don't-cares). Models
  whose forward takes no ``position_ids`` are refused (the padding would shift the positions).
* HF ViT: prefixes through fastpeft's fused prefix attention in each attention module, visual
  prompts inserted after the embeddings by forward hooks. Both are installed once and act only
  while a ``PeftModel`` call with that adapter runs (a :class:`Feed` holds the live tensors).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, List, Optional

import torch
from torch import nn

from fastpeft._dropout import dropout_with_seed, new_seed
from fastpeft.methods.base import Journal, first_param, get_module

__all__ = ["bind", "row_index", "row_lens", "pad_virtual", "Feed",
           "embeds_forward", "cache_forward", "prompt_generate", "install_attention_prefix",
           "install_vpt_hooks", "uninstall", "input_embeddings"]


def bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of ``model.forward`` as keywords."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def row_index(rows: list, batch: int, device) -> tuple:
    """For per-sample adapters (``rows``: one method per sample, None for a ``"__base__"`` row):
    the distinct methods and, for each of ``batch`` rows, the index of its method (``len(uniq)``
    for base rows; ``batch`` may be a multiple of ``len(rows)``: ``generate`` expands each sample
    to its beams / returned sequences, consecutively)."""
    uniq = [m for m in dict.fromkeys(rows) if m is not None]
    if batch % len(rows):
        raise ValueError(f"adapter_names: expected one name per sample ({batch}), got {len(rows)}")
    idx = torch.tensor([len(uniq) if m is None else uniq.index(m) for m in rows], dtype=torch.long, device=device)
    return uniq, idx.repeat_interleave(batch // len(rows))


def row_lens(rows: Optional[list], batch: int, device) -> Optional[torch.Tensor]:
    """``(batch,)`` virtual tokens of each row (0 for ``"__base__"`` rows, None in ``rows``), or
    None when every row has the same number (no padding needed)."""
    if rows is None:
        return None
    lens = [0 if m is None else m.config.num_virtual_tokens for m in rows]
    if len(set(lens)) == 1:
        return None
    if batch % len(rows):
        raise ValueError(f"adapter_names: expected one name per sample ({batch}), got {len(rows)}")
    return torch.tensor(lens, dtype=torch.long, device=device).repeat_interleave(batch // len(rows))


def pad_virtual(t: torch.Tensor, dim: int, P: int) -> torch.Tensor:
    """``t`` zero-padded after its entries along ``dim`` to ``P`` virtual tokens."""
    n = P - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_zeros(shape)], dim)


def _virtual_mask(lens: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, P)`` bool: slot j of row i holds one of its ``lens[i]`` virtual tokens."""
    return torch.arange(P, device=lens.device) < lens[:, None]


def _ragged_mask(n: torch.Tensor, P: int, mask: Optional[torch.Tensor], B: int, S: int, device):
    """For rows with n[i] <= P own virtual tokens: the (B, P) mask of the real virtual slots, and the
    attention mask over virtual slots then the S tokens (the given ``mask``, or all ones)."""
    vm = _virtual_mask(n, P)
    full = torch.cat([vm.long() if mask is None else vm.to(mask.dtype),
                      torch.ones(B, S, dtype=torch.long, device=device) if mask is None else mask], 1)
    return vm, full


def _need_position_ids(model, what: str) -> None:
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"adapter_names: {what} adapters of different num_virtual_tokens (or '__base__' rows) "
                         f"pad the shorter rows with masked virtual tokens, which needs explicit position ids; "
                         f"{type(model).__name__}.forward takes no position_ids")


def input_embeddings(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    for n, m in model.named_modules():
        if n == "embeddings.word_embeddings" or n.endswith(".embeddings.word_embeddings"):
            return m
    raise ValueError(f"{type(model).__name__}: found no input word embeddings for prompt tuning")


def _cache_key(model: nn.Module) -> str:
    """transformers >= 5.24 calls the KV cache argument ``cache`` (``past_key_values`` before)."""
    for m in (model, getattr(model, "base_model", model)):
        if "cache" in inspect.signature(m.forward).parameters:
            return "cache"
    return "past_key_values"


def _hf_text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def make_cache(model: nn.Module, layers):
    from transformers import DynamicCache
    dt = first_param(model).dtype
    return DynamicCache([(k.to(dt), v.to(dt)) for k, v in layers], config=_hf_text_config(model))


def _prepend_mask(mask: Optional[torch.Tensor], B: int, P: int, S: int, device) -> torch.Tensor:
    if mask is None:
        mask = torch.ones(B, S, dtype=torch.long, device=device)
    return torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], dim=1)


def embeds_forward(model, prompts: Callable[[int], torch.Tensor], P: int, task_type, call, kw: dict,
                   lens: Optional[Callable[[int], Optional[torch.Tensor]]] = None):
    """Prompt tuning as ``peft.PeftModelFor*.forward``: ``[prompts ; embeds]``; ``lens``: ``B ->``
    each row's virtual tokens (:func:`row_lens`; P is then their max, the rest padding)."""
    input_ids, inputs_embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
    mask, labels = kw.pop("attention_mask", None), kw.pop("labels", None)
    ref = input_ids if input_ids is not None else inputs_embeds
    B = ref.shape[0]
    kw.pop("position_ids", None)  # PEFT drops them (prompt tuning positions are 0 .. P + S - 1)
    n = lens(B) if lens is not None else None
    if n is not None:
        _need_position_ids(model, "prompt tuning")
        S = ref.shape[1]
        vm, mask = _ragged_mask(n, P, mask, B, S, ref.device)
        kw["position_ids"] = torch.cat([torch.where(vm, torch.arange(P, device=ref.device), 0),
                                        n[:, None] + torch.arange(S, device=ref.device)], 1)
    elif mask is not None:
        mask = _prepend_mask(mask, B, P, mask.shape[1], mask.device)
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = None  # PEFT drops them: they would not cover the virtual tokens
    if inputs_embeds is None:
        inputs_embeds = input_embeddings(model)(input_ids)
    if labels is not None:
        if task_type == "CAUSAL_LM":
            labels = torch.cat([torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        kw["labels"] = labels
    embeds = torch.cat([prompts(B).to(inputs_embeds.dtype), inputs_embeds], dim=1)
    return call(inputs_embeds=embeds, attention_mask=mask, **kw)


def cache_forward(model, layers: Callable[[int], list], P: int, call, kw: dict,
                  lens: Optional[Callable[[int], Optional[torch.Tensor]]] = None):
    """Prefix tuning as PEFT: per-layer prefixes as a ``DynamicCache`` in front of the tokens;
    ``lens`` as in :func:`embeds_forward` (padded cache entries masked out)."""
    input_ids, inputs_embeds, mask = kw.get("input_ids"), kw.get("inputs_embeds"), kw.pop("attention_mask", None)
    ref = input_ids if input_ids is not None else inputs_embeds
    B = ref.shape[0]
    n = lens(B) if lens is not None else None
    if n is not None:
        _need_position_ids(model, "prefix tuning")
        S = ref.shape[1]
        vm, mask = _ragged_mask(n, P, mask, B, S, ref.device)
        pos = kw.get("position_ids")
        pos = torch.arange(S, device=ref.device).expand(B, -1) if pos is None else pos
        kw["position_ids"] = pos + n[:, None]
    else:
        if mask is not None:
            mask = _prepend_mask(mask, B, P, mask.shape[1], mask.device)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + P
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = None
    kw[_cache_key(model)] = make_cache(model, layers(B))
    return call(attention_mask=mask, **kw)


def prompt_generate(model, generate: Callable, kw: dict, P: int, prompts: Optional[Callable] = None,
                    layers: Optional[Callable] = None, lens: Optional[Callable] = None):
    """``model.generate`` with ``P`` virtual tokens in front: prompt embeddings (``prompts``) or
    cached prefixes (``layers``); ``lens`` as in :func:`embeds_forward`; see the module docstring."""
    input_ids, inputs_embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("generate: expected input_ids or inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    B, S, dev = ref.shape[0], ref.shape[1], ref.device
    n = lens(B) if lens is not None else None
    mask = _prepend_mask(kw.pop("attention_mask", None), B, P, S, dev)
    if n is not None:
        _need_position_ids(model, "prompt tuning" if prompts is not None else "prefix tuning")
        vm = _virtual_mask(n, P)
        mask[:, :P] = vm.to(mask.dtype)
    gc = getattr(model, "generation_config", None)
    if "max_new_tokens" not in kw and getattr(gc, "max_new_tokens", None) is None:
        kw["max_length"] = kw.get("max_length", getattr(gc, "max_length", None) or 20) + P
    if kw.get("min_length"):
        kw["min_length"] += P
    pos = kw.pop("position_ids", None)
    if n is not None:  # per row: virtual tokens 0 .. P_i - 1 (padding slots: 0), tokens from P_i
        pos = torch.arange(S, device=dev).expand(B, -1) if pos is None else pos
        kw["position_ids"] = torch.cat([torch.where(vm, torch.arange(P, device=dev), 0), pos + n[:, None]], 1)
    elif "position_ids" in inspect.signature(model.forward).parameters:
        pos = torch.arange(P + S, device=dev).expand(B, -1) if pos is None else \
            torch.cat([torch.arange(P, device=dev).expand(B, -1), pos + P], 1)
        kw["position_ids"] = pos
    kw.pop("token_type_ids", None)
    fill = getattr(gc, "pad_token_id", None) or 0
    ids = None if input_ids is None else torch.cat(
        [torch.full((B, P), int(fill), dtype=input_ids.dtype, device=dev), input_ids], 1)
    if prompts is not None:
        embeds = inputs_embeds if inputs_embeds is not None else input_embeddings(model)(input_ids)
        kw["inputs_embeds"] = torch.cat([prompts(B).to(embeds.dtype), embeds], 1)
    else:
        if ids is None:
            raise ValueError("generate: prefix tuning needs input_ids")
        beams = kw.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        expand = beams if beams > 1 else (kw.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1)
        kw[_cache_key(model)] = make_cache(model, layers(B * expand))
    out = generate(input_ids=ids, attention_mask=mask, **kw)
    if ids is None:
        return out
    if hasattr(out, "sequences"):
        out.sequences = out.sequences[:, P:]
        return out
    return out[:, P:]


# ---------------------------------------------------------------------------------------------
# HF ViT: hooks that act while a Feed holds tensors
# ---------------------------------------------------------------------------------------------
class Feed:
    """The tensors a hooked model reads during one ``PeftModel`` call (None otherwise)."""

    def __init__(self):
        self.value = None


def _prefix_attention_forward(attn: nn.Module, feed: Feed, index: int, hidden_states, attention_mask=None,
                              **kwargs):
    """An HF ViT ``attention`` module with this call's prefix for layer ``index`` (fused op)."""
    if feed.value is None:
        return type(attn).forward(attn, hidden_states, attention_mask, **kwargs)
    from fastpeft.ops.prefix_attention import prefix_attention
    pk, pv = feed.value[index]
    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
    out = prefix_attention(q, k, v, pk.to(q.dtype), pv.to(q.dtype), attn_mask=attention_mask, scale=attn.scaling)
    out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return attn.o_proj(out), None


def install_attention_prefix(model: nn.Module, fam, feed: Feed, journal: Journal) -> Feed:
    """Route the attention modules through fastpeft's prefix attention, reading ``feed``; when an
    earlier prefix adapter did so already, its feed is returned and shared (one runs at a time)."""
    attns = [get_module(layer, fam.attention_paths) for layer in get_module(model, fam.layers)]
    fwd = attns[0].__dict__.get("forward")
    if isinstance(fwd, functools.partial) and fwd.func is _prefix_attention_forward:
        return fwd.args[1]
    for i, attn in enumerate(attns):
        attn.forward = functools.partial(_prefix_attention_forward, attn, feed, i)
    journal.on_undo(lambda: uninstall(model, feed))
    return feed


class _InsertPrompts:
    """Forward hook on the embeddings: ``[CLS ; prompts_0 ; patches]``."""

    def __init__(self, feed: Feed):
        self.feed = feed

    def __call__(self, module, args, out):
        if self.feed.value is None:
            return out
        p = self.feed.value[0]
        return torch.cat([out[:, :1], p.to(out.dtype), out[:, 1:]], dim=1)


class _ReplacePrompts:
    """Forward pre-hook on block ``i`` (deep VPT): prompt slots <- prompts_i."""

    def __init__(self, feed: Feed, i: int):
        self.feed, self.i = feed, i

    def __call__(self, module, args):
        if self.feed.value is None:
            return None
        x, p = args[0], self.feed.value[self.i]
        x = torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + p.shape[1]:]], dim=1)
        return (x, *args[1:])


def install_vpt_hooks(model: nn.Module, fam, feed: Feed, deep: bool, journal: Journal) -> None:
    get_module(model, fam.embeddings).register_forward_hook(_InsertPrompts(feed))
    if deep:
        for i, layer in enumerate(get_module(model, fam.layers)):
            if i:
                layer.register_forward_pre_hook(_ReplacePrompts(feed, i))
    journal.on_undo(lambda: uninstall(model, feed))


def uninstall(model: nn.Module, feed: Feed) -> None:
    """Remove every hook / attention override reading ``feed`` (found again, not remembered, so
    copies and unpickled models remove their own)."""
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and feed in fwd.args:
            del m.__dict__["forward"]
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for k in [k for k, h in hooks.items() if getattr(h, "feed", None) is feed]:
                del hooks[k]


def vpt_prompts(table: torch.Tensor, batch: int, p: float, training: bool) -> List[torch.Tensor]:
    """Per-block prompts ``(B, P, D)`` (dropout per sample in training: fastpeft's counter-based
    masks, as ``fastpeft.VPT``, so data-parallel ranks draw their own with ``set_dropout_rank``)."""
    out = []
    for t in table:
        t = t.unsqueeze(0).expand(batch, -1, -1)
        out.append(dropout_with_seed(t, new_seed(), p) if training and p > 0 else t)
    return out
