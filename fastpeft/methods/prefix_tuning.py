"""Prefix tuning (``peft_type`` "PREFIX_TUNING", Li & Liang): learned key/value prefixes for every
attention layer, in PEFT's layout (:class:`fastpeft.PrefixEncoder`).

How the prefixes reach the attention comes from the model-family table: fastpeft's ViT / BERT
take them as ``prefix_kv`` (fused prefix attention, one prefix shared by the batch); HF ViT runs
fastpeft's prefix attention in its attention modules; other HF models get them as PEFT does, a
``DynamicCache`` of ``past_key_values`` (``generate`` included, KV cache and all).
With ``adapter_names=[...]`` naming prefix adapters, each sample gets its own adapter's prefixes
(Bp = B in prefix attention, a per-sample cache for HF text models) over the one frozen model.
On HF text models (the cache) those adapters may differ in ``num_virtual_tokens`` and
``"__base__"`` rows may join (padded cache entries masked out, see ``_prompting``); fastpeft's
ViT / BERT and HF ViT refuse both (``prefix_attention`` attends to every prefix key).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastpeft import families
from fastpeft.config import _PromptConfig
from fastpeft.methods import _prompting as feed
from fastpeft.methods.base import Journal, PeftMethod, first_param, register_method
from fastpeft.methods.prompt_tuning import fill_prompt_dims

__all__ = ["PrefixTuningConfig", "PrefixTuningMethod"]


@dataclass
class PrefixTuningConfig(_PromptConfig):
    """Prefix tuning: learned key/value prefixes for every attention layer.

    ``prefix_projection``: reparametrise through a 2-layer MLP of width ``encoder_hidden_size``
    while training; the checkpoint stores the projected prefixes (as PEFT does)."""
    peft_type = "PREFIX_TUNING"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    @classmethod
    def _unsupported(cls):
        return {"init_weights": (None,)}


@register_method
class PrefixTuningMethod(PeftMethod):
    config_class = PrefixTuningConfig

    @classmethod
    def prepare_config(cls, model, config):
        return fill_prompt_dims(model, config, kv_heads=True)

    def inject(self, journal: Journal, loading: bool = False) -> None:
        from fastpeft.modules.prefix import PrefixEncoder

        c, model = self.config, self.model
        self.family = families.family_of(model)
        if self.family.prefix is None:
            raise ValueError(f"PrefixTuningConfig: no attention layers known in {type(model).__name__}")
        w = first_param(model)
        # a PEFT checkpoint in inference mode holds the projected table: no projection MLP then
        projection = c.prefix_projection and not c.inference_mode
        H = c.num_attention_heads
        enc = PrefixEncoder(c.num_layers, H, c.token_dim // H, c.num_virtual_tokens, projection,
                            encoder_hidden_size=c.encoder_hidden_size or c.token_dim, token_dim=c.token_dim,
                            device=w.device, dtype=w.dtype)
        self.pm.prompt_encoder[self.name] = enc
        journal.on_undo(lambda: self.pm.prompt_encoder.pop(self.name))
        self.feed = feed.Feed()
        if self.family.prefix == "attention":
            self.feed = feed.install_attention_prefix(model, self.family, self.feed, journal)

    @property
    def encoder(self):
        return self.pm.prompt_encoder[self.name]

    def tensors(self) -> Dict[str, torch.Tensor]:
        # what PEFT saves as prompt_embeddings: the (projected) prefix table (P, num_layers·2·W)
        return {"prompt_embeddings": self.encoder.table()[0]}

    def parameters(self):
        return list(self.encoder.parameters())

    def load(self, tensors) -> None:
        enc = self.encoder
        with torch.no_grad():
            if enc.prefix_projection:
                enc.fold()  # the file holds projected prefixes: they become the plain table
            enc.embedding.weight.copy_(tensors["prompt_embeddings"])

    def config_dict(self) -> dict:
        d = self.config.to_dict()
        d["inference_mode"] = True  # the checkpoint holds the projected prefixes: readers must not re-project
        return d

    def delete(self) -> None:
        if not any(m is not self and getattr(m, "feed", None) is self.feed for m in self.pm._methods.values()):
            feed.uninstall(self.model, self.feed)
        self.pm.prompt_encoder.pop(self.name)

    #: ``adapter_names=[...]`` of prefix tuning adapters: each sample its own prefixes (Bp = B)
    supports_row_prompts = True

    def _layers(self, rows):
        """``B -> per-layer (k, v)``: this adapter's prefixes expanded to B, or each sample's own
        (``rows``: one method per sample, None for ``"__base__"``), ``(B, Hkv, P, hd)`` each: Bp = B
        in prefix_attention; P the largest ``num_virtual_tokens``, shorter prefixes (and base
        rows) zero-padded after their entries (masked out by the caller)."""
        if rows is None:
            return lambda B: self.encoder(batch_size=B)
        P = _max_tokens(rows)

        def per_row(B):
            uniq, idx = feed.row_index(rows, B, first_param(self.encoder).device)
            per = [[tuple(feed.pad_virtual(t, 2, P) for t in kv) for kv in m.encoder()] for m in uniq]
            if any(m is None for m in rows):  # base rows: every slot padding
                per.append([tuple(torch.zeros_like(t) for t in kv) for kv in per[0]])
            return [tuple(torch.cat([p[i][j] for p in per]).index_select(0, idx) for j in (0, 1))
                    for i in range(len(per[0]))]
        return per_row

    def _lens(self, rows):
        if feed.row_lens(rows, len(rows), "cpu") is None:
            return None
        if self.family.prefix != "cache":
            names = {m.name: m.config.num_virtual_tokens for m in rows if m is not None}
            raise ValueError(f"adapter_names: on {self.family.name} models prefixes run through fastpeft's "
                             f"prefix_attention, which attends to every prefix key (no mask over them), so per-sample "
                             f"prefix adapters need the same num_virtual_tokens and no '__base__' rows; got "
                             f"{names}{' and __base__ rows' if None in rows else ''}")
        return lambda B: feed.row_lens(rows, B, first_param(self.encoder).device)

    def _batch_size(self, args, kwargs) -> int:
        kw = feed.bind(self.model, args, kwargs)
        for key in ("input_ids", "inputs_embeds", "images", "pixel_values", "x"):
            if kw.get(key) is not None:
                return kw[key].shape[0]
        first = next((v for v in kw.values() if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise ValueError("adapter_names: found no batched input to give per-sample prefixes")
        return first.shape[0]

    def wrap_forward(self, call, args, kwargs, rows=None):
        dt = first_param(self.model).dtype
        kind = self.family.prefix
        layers = self._layers(rows)
        lens = self._lens(rows) if rows is not None else None
        if kind in ("native", "attention"):
            # Bp = 1 (one prefix shared by the batch, never expanded) or Bp = B (one per sample)
            kv = self.encoder() if rows is None else layers(self._batch_size(args, kwargs))
        if kind == "native":
            kw = dict(kwargs)
            kw["prefix_kv"] = [(k.to(dt), v.to(dt)) for k, v in kv]
            return call(*args, **kw)
        if kind == "attention":
            self.feed.value = kv
            try:
                return call(*args, **kwargs)
            finally:
                self.feed.value = None
        kw = feed.bind(self.model, args, kwargs)
        P = self.config.num_virtual_tokens if rows is None else _max_tokens(rows)
        return feed.cache_forward(self.model, layers, P, call, kw, lens=lens)

    def generate(self, generate, kwargs, rows=None):
        if self.family.prefix != "cache":
            raise ValueError(f"generate: prefix tuning on {self.family.name} models has no generation")
        P = self.config.num_virtual_tokens if rows is None else _max_tokens(rows)
        return feed.prompt_generate(self.model, generate, dict(kwargs), P, layers=self._layers(rows),
                                    lens=self._lens(rows) if rows is not None else None)


def _max_tokens(rows) -> int:
    return max(m.config.num_virtual_tokens for m in rows if m is not None)
