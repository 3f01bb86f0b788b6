"""Prompt tuning (``peft_type`` "PROMPT_TUNING", Lester et al.): learned virtual-token embeddings
in front of the input embeddings of a Hugging Face model (or fastpeft's BERT), fed as PEFT feeds
them; ``generate`` decodes with them (KV cache and all). Per-sample adapters (``adapter_names``)
may differ in ``num_virtual_tokens`` (shorter prompts padded with masked virtual tokens, see
``_prompting``); ``"__base__"`` rows (all virtual tokens masked) on causal LMs only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastpeft import families
from fastpeft.config import _check, _PromptConfig
from fastpeft.methods import _prompting as feed
from fastpeft.methods.base import Journal, PeftMethod, first_param, register_method, with_seq_cls_head

__all__ = ["PromptTuningConfig", "PromptTuningMethod", "fill_prompt_dims"]


@dataclass
class PromptTuningConfig(_PromptConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the input embeddings.

    prompt_tuning_init: "RANDOM", "TEXT" (rows of the model's word embeddings at the tokens of
    ``prompt_tuning_init_text``, tokenized with ``AutoTokenizer.from_pretrained(
    tokenizer_name_or_path, **tokenizer_kwargs)``, repeated then truncated, as PEFT) or
    "SAMPLE_VOCAB" (rows at random token ids)."""
    peft_type = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        _check(init in ("RANDOM", "TEXT", "SAMPLE_VOCAB"),
               f"prompt_tuning_init: expected 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB', got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            _check(bool(self.prompt_tuning_init_text) and bool(self.tokenizer_name_or_path),
                   "prompt_tuning_init='TEXT': expected prompt_tuning_init_text and tokenizer_name_or_path, got "
                   f"{self.prompt_tuning_init_text!r} and {self.tokenizer_name_or_path!r}")


def fill_prompt_dims(model, config, kv_heads: bool = False):
    """A copy of ``config`` with the model dimensions PEFT fills in (num_layers, token_dim, heads,
    task_type); ``kv_heads``: prefixes are keys/values (grouped-query attention: the kv heads)."""
    fam = families.family_of(model)
    if fam.dims is None:
        raise ValueError(f"{type(config).__name__}: needs a Hugging Face transformers model or fastpeft's ViT / BERT, "
                         f"got {type(model).__name__}")
    d = fam.dims(model)
    fill = dict(num_layers=d["num_layers"], token_dim=d["token_dim"], num_attention_heads=d["num_attention_heads"],
                num_transformer_submodules=1)
    if kv_heads and fam.prefix == "cache":
        fill.update(num_attention_heads=d["num_kv_heads"], token_dim=d["num_kv_heads"] * d["head_dim"])
    config = dataclasses.replace(config, **{k: v for k, v in fill.items() if getattr(config, k) is None})
    if config.task_type is None and families.is_hf(model):
        n = type(model).__name__
        tt = next((t for s, t in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                                  ("ForTokenClassification", "TOKEN_CLS")) if n.endswith(s)), "FEATURE_EXTRACTION")
        config = dataclasses.replace(config, task_type=tt)
    return with_seq_cls_head(model, config)


@register_method
class PromptTuningMethod(PeftMethod):
    config_class = PromptTuningConfig

    @classmethod
    def prepare_config(cls, model, config):
        return fill_prompt_dims(model, config)

    def inject(self, journal: Journal, loading: bool = False) -> None:
        from fastpeft.modules.prompt import PromptTuning

        c, model = self.config, self.model
        fam = families.family_of(model)
        if not fam.prompt_tuning:
            raise ValueError(f"PromptTuningConfig: for {fam.name} models use VPTConfig (prompt tokens after [CLS])")
        w = first_param(model)
        init = "random" if loading else {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "vocab"}[c.prompt_tuning_init]
        ids = None
        if init == "text":
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(c.tokenizer_name_or_path, **(c.tokenizer_kwargs or {}))
            ids = tok(c.prompt_tuning_init_text)["input_ids"]
        emb = feed.input_embeddings(model) if init != "random" else None
        enc = PromptTuning(c.num_virtual_tokens, c.token_dim, init=init, word_embeddings=emb, init_token_ids=ids)
        self.pm.prompt_encoder[self.name] = enc.to(device=w.device, dtype=w.dtype)
        journal.on_undo(lambda: self.pm.prompt_encoder.pop(self.name))

    @property
    def encoder(self):
        return self.pm.prompt_encoder[self.name]

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.encoder.embedding.weight}

    def delete(self) -> None:
        self.pm.prompt_encoder.pop(self.name)

    #: ``adapter_names=[...]`` of prompt tuning adapters: each sample its own prompts
    supports_row_prompts = True

    def _prompts(self, rows):
        """``B -> (B, P, D)`` prompts: this adapter's for every sample, or each sample's own
        (``rows``: one method per sample, None for ``"__base__"``; gradients reach each adapter
        from its samples only); P the largest ``num_virtual_tokens``, shorter prompts (and base
        rows) zero-padded after theirs (masked out by the caller)."""
        if rows is None:
            return self.encoder
        P = self._P(rows)

        def per_row(B):
            uniq, idx = feed.row_index(rows, B, self.encoder.embedding.weight.device)
            per = [feed.pad_virtual(m.encoder(), 0, P) for m in uniq]
            if any(m is None for m in rows):
                per.append(torch.zeros_like(per[0]))
            return torch.stack(per).index_select(0, idx)
        return per_row

    def _P(self, rows) -> int:
        return self.config.num_virtual_tokens if rows is None else \
            max(m.config.num_virtual_tokens for m in rows if m is not None)

    def _lens(self, rows):
        if rows is None or feed.row_lens(rows, len(rows), "cpu") is None:
            return None
        if None in rows and not _is_causal_lm(self.model, self.config.task_type):
            raise ValueError(f"adapter_names: '__base__' rows with prompt tuning need a causal LM (task_type "
                             f"'CAUSAL_LM' or a transformers causal-LM class), got {type(self.model).__name__} "
                             f"(task_type {self.config.task_type!r}): a base row starts with masked virtual tokens, "
                             f"and the model may read a fixed position (e.g. a [CLS] pooler); run the base rows in "
                             f"their own batch")
        return lambda B: feed.row_lens(rows, B, self.encoder.embedding.weight.device)

    def wrap_forward(self, call, args, kwargs, rows=None):
        kw = feed.bind(self.model, args, kwargs)
        return feed.embeds_forward(self.model, self._prompts(rows), self._P(rows), self.config.task_type, call, kw,
                                   lens=self._lens(rows))

    def generate(self, generate, kwargs, rows=None):
        return feed.prompt_generate(self.model, generate, dict(kwargs), self._P(rows), prompts=self._prompts(rows),
                                    lens=self._lens(rows))


def _is_causal_lm(model, task_type) -> bool:
    """Decoder-only LMs read no fixed position (each token sees the ones before it)."""
    if task_type == "CAUSAL_LM":
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
