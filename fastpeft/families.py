"""The model-family table: everything the model level needs to know about a model architecture.

One place answers, for every supported family (fastpeft's ViT and BERT, Hugging Face BERT-like
encoders, ViT, LLaMA-like decoders and GPT-2):

* :data:`BLOCKS`: how to recognise a transformer block and where adapters go in it (attention
  output, FFN output, the parallel-adapter site),
* :data:`FAMILIES`: default LoRA targets, fused projections (the reference ViT's ``qkv``), how
  prompt methods feed the model (``prefix``: ``native`` / ``cache`` / ``attention``; ``vpt``:
  ``native`` / ``hooks``) and the prompt dimensions,
* :data:`HEAD_NAMES` / :func:`head_paths`: the output head (excluded from ``all-linear`` and from
  BitFit; used by ``strategies.replace_head``), and :func:`bias_names` (BitFit, shared by the
  ``BitFitConfig`` method and ``strategies.bitfit``).

A new architecture is one more :class:`BlockSpec` / :class:`Family` entry here; methods never
test model classes themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

__all__ = ["HEAD_NAMES", "PART_ALIASES", "BlockSpec", "BLOCKS", "Family", "FAMILIES", "family_of", "block_sites", "head_paths",
           "bias_names", "out_features", "is_hf", "layer_index"]

#: names of output heads (the last component of a module path)
HEAD_NAMES = ("head", "lm_head", "classifier", "score", "fc")


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face ``transformers`` model (a config with ``to_dict`` and input embeddings)."""
    c = getattr(model, "config", None)
    return c is not None and hasattr(model, "get_input_embeddings") and hasattr(c, "to_dict") \
        and type(c).__module__.startswith("transformers")


def _has(m: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(m, part):
            return False
        m = getattr(m, part)
    return True


def out_features(m: nn.Module) -> int:
    """Output width of a Linear / GPT-2 Conv1D, looking through fastpeft wrappers (``base_layer``)."""
    while hasattr(m, "base_layer"):
        m = m.base_layer
    if hasattr(m, "out_features"):
        return m.out_features
    if hasattr(m, "nf"):  # transformers' Conv1D
        return m.nf
    raise ValueError(f"{type(m).__name__}: no output width")


# ---------------------------------------------------------------------------------------------
# transformer blocks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSpec:
    """A transformer block, recognised by the sub-paths in ``requires`` (block-relative).

    parallel: where a parallel (AdaptFormer) adapter goes: ``("slot", attr)`` (an empty attribute
    the block calls), ``("bert_output", path)`` (a post-norm BERT output module) or
    ``("prenorm", norm, mlp)`` (capture the residual at the norm before the MLP)."""
    name: str
    requires: Tuple[str, ...]
    attn_out: str
    ffn_out: str
    parallel: Tuple[str, ...]


BLOCKS: Tuple[BlockSpec, ...] = (
    BlockSpec("fastpeft-vit", ("attn.proj", "mlp.fc2", "parallel_adapter"), "attn.proj", "mlp.fc2",
              ("slot", "parallel_adapter")),
    BlockSpec("bert", ("attention.output.dense", "output.dense", "intermediate"), "attention.output.dense",
              "output.dense", ("bert_output", "output")),
    BlockSpec("hf-vit", ("attention.o_proj", "mlp.fc2", "layernorm_after"), "attention.o_proj", "mlp.fc2",
              ("prenorm", "layernorm_after", "mlp")),
    BlockSpec("llama", ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"), "self_attn.o_proj",
              "mlp.down_proj", ("prenorm", "post_attention_layernorm", "mlp")),
    BlockSpec("gpt2", ("attn.c_proj", "mlp.c_proj", "ln_2"), "attn.c_proj", "mlp.c_proj", ("prenorm", "ln_2", "mlp")),
)


def block_sites(model: nn.Module) -> List[dict]:
    """Every transformer block of ``model``: ``[{spec, path, attn_out, ffn_out, parallel, dim}]``
    with model-relative paths."""
    sites = []
    for name, m in model.named_modules():
        for spec in BLOCKS:
            if all(_has(m, r) for r in spec.requires):
                p = f"{name}." if name else ""
                kind, *paths = spec.parallel
                sites.append(dict(spec=spec, path=name, attn_out=p + spec.attn_out, ffn_out=p + spec.ffn_out,
                                  parallel=(kind, *[p + q for q in paths]),
                                  dim=out_features(m.get_submodule(spec.ffn_out))))
                break
    return sites


def layer_index(path: str, layers_pattern=None) -> Optional[int]:
    """The block index in a module path (PEFT's ``layers_to_transform`` rule: the first numbered
    segment, or the number after one of ``layers_pattern``)."""
    import re
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", path)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


# ---------------------------------------------------------------------------------------------
# model families
# ---------------------------------------------------------------------------------------------
def _hf_text_config(model):
    c = model.config
    return c.get_text_config() if hasattr(c, "get_text_config") else c


def _hf_dims(model) -> dict:
    c = _hf_text_config(model)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return dict(num_layers=layers, token_dim=hidden, num_attention_heads=heads, num_kv_heads=kv, head_dim=head_dim)


def _fp_vit_dims(model) -> dict:
    c = model.config
    return dict(num_layers=len(model.blocks), token_dim=c.dim, num_attention_heads=c.heads, num_kv_heads=c.heads,
                head_dim=c.dim // c.heads)


def _fp_bert_dims(model) -> dict:
    c = model.config
    return dict(num_layers=c.num_hidden_layers, token_dim=c.hidden_size, num_attention_heads=c.num_attention_heads,
                num_kv_heads=c.num_attention_heads, head_dim=c.hidden_size // c.num_attention_heads)


def _is_fp_vit(model) -> bool:
    from fastpeft.models.vit import ViT
    return isinstance(model, ViT)


def _is_fp_bert(model) -> bool:
    from fastpeft.models.bert import BertForSequenceClassification, BertModel
    return isinstance(model, (BertModel, BertForSequenceClassification))


def _is_hf_vit(model) -> bool:
    return is_hf(model) and getattr(model.config, "model_type", None) == "vit"


#: names a part of a fused projection answers to in ``target_modules`` (besides its own)
PART_ALIASES: Dict[str, Tuple[str, ...]] = {"q": ("q", "q_proj", "query"), "k": ("k", "k_proj", "key"),
                                            "v": ("v", "v_proj", "value")}

#: PEFT's default LoRA targets by ``config.model_type`` (the families fastpeft is tested on and a few more)
HF_LORA_TARGETS: Dict[str, Tuple[str, ...]] = {
    "gpt2": ("c_attn",), "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"), "gpt_neox": ("query_key_value",), "bloom": ("query_key_value",),
    "t5": ("q", "v"), "bart": ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class Family:
    """Model-level facts. ``prefix``: how prefix tuning reaches the attention (``native``: the
    model's ``prefix_kv`` argument, fused prefix attention; ``cache``: PEFT's ``past_key_values``;
    ``attention``: the HF attention modules at ``attention_paths`` run fastpeft's prefix attention).
    ``vpt``: ``native`` (fastpeft.VPT) or ``hooks`` (prompts inserted after the HF embeddings).
    ``fused``: fused projections (leaf name -> equal output slices) that LoRA may target per slice,
    e.g. ``["q", "v"]`` on the reference ViT's ``qkv``."""
    name: str
    detect: Callable[[nn.Module], bool]
    dims: Optional[Callable[[nn.Module], dict]] = None
    lora_targets: Optional[Tuple[str, ...]] = None
    fused: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    prefix: Optional[str] = None
    vpt: Optional[str] = None
    prompt_tuning: bool = True
    embeddings: Optional[str] = None  # HF ViT: the embeddings module VPT hooks into
    layers: Optional[str] = None      # HF ViT: the block list
    attention_paths: Optional[str] = None  # HF ViT: attention module, relative to a block


FAMILIES: Tuple[Family, ...] = (
    Family("fastpeft-vit", _is_fp_vit, _fp_vit_dims, ("qkv",), {"qkv": ("q", "k", "v")}, prefix="native",
           vpt="native", prompt_tuning=False),
    Family("fastpeft-bert", _is_fp_bert, _fp_bert_dims, ("query", "value"), prefix="native"),
    Family("hf-vit", _is_hf_vit, _hf_dims, ("q_proj", "v_proj"), prefix="attention", vpt="hooks",
           prompt_tuning=False, embeddings="vit.embeddings", layers="vit.layers", attention_paths="attention"),
    Family("hf", is_hf, _hf_dims, prefix="cache"),
    Family("module", lambda m: True),
)


def family_of(model: nn.Module) -> Family:
    return next(f for f in FAMILIES if f.detect(model))


def default_lora_targets(model: nn.Module, present: set) -> Optional[List[str]]:
    """PEFT's defaults for HF models (by ``model_type``), else the family's, else the first
    attention-projection pair present."""
    fam = family_of(model)
    if is_hf(model):
        t = HF_LORA_TARGETS.get(getattr(model.config, "model_type", None))
        if t:
            return list(t)
    if fam.lora_targets and all(t in present for t in fam.lora_targets):
        return list(fam.lora_targets)
    for cand in (["q_proj", "v_proj"], ["query", "value"], ["qkv"], ["c_attn"]):
        if all(c in present for c in cand):
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# heads and biases
# ---------------------------------------------------------------------------------------------
def head_paths(model: nn.Module) -> List[str]:
    """The output head(s): the HF output embeddings and modules named one of :data:`HEAD_NAMES`
    outside the transformer blocks (a model without either: its last ``nn.Linear``)."""
    heads: List[str] = []
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            out_emb = None
    blocks = [s["path"] for s in block_sites(model)]
    for name, m in model.named_modules():
        if not name or any(name.startswith(b + ".") for b in blocks if b):
            continue
        if (out_emb is not None and m is out_emb) or name.rpartition(".")[2] in HEAD_NAMES:
            if not any(name.startswith(h + ".") for h in heads):
                heads.append(name)
    if not heads and not is_hf(model):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        if linears:
            heads.append(linears[-1])
    return heads


def under(name: str, roots: List[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def bias_names(model: nn.Module, heads: Optional[List[str]] = None) -> List[str]:
    """BitFit's parameters: every ``*.bias`` (LayerNorm beta included) outside the output head(s)."""
    heads = head_paths(model) if heads is None else heads
    return [pn for pn, _ in model.named_parameters()
            if pn.rpartition(".")[2] == "bias" and not under(pn.rpartition(".")[0], heads)]
