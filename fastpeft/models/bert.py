"""A plain BERT encoder with Hugging Face BERT's module names and state-dict keys.

``BertModel`` / ``BertForSequenceClassification`` here load a ``transformers`` BERT's
``state_dict()`` unchanged (same keys, same shapes), so ``target_modules`` written for HF BERT
(``query``, ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) work, and outputs can be checked against HF.

Every layer takes ``prefix_kv = (prefix_k, prefix_v)``, each ``(Bp, heads, P, head_dim)`` with
Bp 1 or B: learned keys/values every query attends to (prefix tuning), run by the fused
``fastpeft.prefix_attention`` op. Padding masks cover the real tokens only; prefixes are always
visible. Attention-probability dropout is applied on the plain path only (the fused prefix op
has none), hidden-state dropout everywhere, as in HF.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "BertOutput", "BertLayer"]

PrefixKV = Tuple[torch.Tensor, torch.Tensor]

_ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf GELU, as HF's "gelu"
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


@dataclass
class BertConfig:
    """BERT shape; field names as in ``transformers.BertConfig``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    classifier_dropout: Optional[float] = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: expected a multiple of num_attention_heads="
                             f"{self.num_attention_heads}, got {self.hidden_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: expected one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")

    @classmethod
    def tiny(cls, **kw) -> "BertConfig":
        """BERT-Tiny shape (2 layers, hidden 128, 2 heads, intermediate 512)."""
        return cls(**{**dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=512), **kw})

    @classmethod
    def base(cls, **kw) -> "BertConfig":
        """BERT-Base shape (12 layers, hidden 768, 12 heads, intermediate 3072)."""
        return cls(**kw)

    @classmethod
    def from_hf(cls, hf_config) -> "BertConfig":
        """The same shape as a ``transformers.BertConfig`` (fields this model does not use are ignored)."""
        return cls(**{f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)})


class BertOutput(NamedTuple):
    """``last_hidden_state (B, S, hidden)`` and ``pooler_output (B, hidden)`` (None without a pooler)."""

    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor]


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids (B, S)`` or ``inputs_embeds (B, S, hidden)`` -> ``(B, S, hidden)``."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        b, s = inputs_embeds.shape[:2]
        if s > self.position_embeddings.num_embeddings:
            raise ValueError(f"input_ids: expected at most {self.position_embeddings.num_embeddings} "
                             f"tokens, got {s}")
        pos = self.position_embeddings(torch.arange(s, device=inputs_embeds.device))
        if token_type_ids is None:
            token_type_ids = torch.zeros(b, s, dtype=torch.long, device=inputs_embeds.device)
        x = inputs_embeds + self.token_type_embeddings(token_type_ids) + pos
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Separate query/key/value projections; returns the heads' concatenated context ``(B, S, hidden)``."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.attention_head_size = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # (B, S, hidden) -> (B, heads, S, head_dim)
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                prefix_kv: Optional[PrefixKV] = None) -> torch.Tensor:
        """``hidden (B, S, hidden)``; ``mask``: additive ``(B, 1, 1, S)`` over the real keys or None."""
        b, s, d = hidden.shape
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        if prefix_kv is None:
            p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            # imported here: the op lives in another module and is only needed for prefix tuning
            from fastpeft.ops.prefix_attention import prefix_attention

            if mask is not None:  # the op takes (B, H, L, S); a stride-0 view costs nothing
                mask = mask.expand(b, self.num_attention_heads, s, s)
            out = prefix_attention(q, k, v, prefix_kv[0], prefix_kv[1], attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, d)


class BertSelfOutput(nn.Module):
    """``LayerNorm(dropout(dense(context)) + input)``."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + input_tensor)


class BertAttention(nn.Module):
    """``self`` (multi-head attention) followed by ``output`` (projection, residual, LayerNorm)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                prefix_kv: Optional[PrefixKV] = None) -> torch.Tensor:
        return self.output(self.self(hidden, mask, prefix_kv), hidden)


class BertIntermediate(nn.Module):
    """``act(dense(x))``: hidden -> intermediate."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[c.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertFFNOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + input)``: intermediate -> hidden (HF calls this ``BertOutput``)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + input_tensor)


class BertLayer(nn.Module):
    """Post-norm transformer layer: attention, then the feed-forward network."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertFFNOutput(c)

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                prefix_kv: Optional[PrefixKV] = None) -> torch.Tensor:
        a = self.attention(hidden, mask, prefix_kv)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None,
                prefix_kv: Optional[Sequence[Optional[PrefixKV]]] = None) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            hidden = layer(hidden, mask, None if prefix_kv is None else prefix_kv[i])
        return hidden


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's representation."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """BERT encoder: ``embeddings``, ``encoder.layer[i]``, optional ``pooler``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None,
    prefix_kv=None) -> BertOutput(last_hidden_state (B, S, hidden), pooler_output (B, hidden))``.
    """

    def __init__(self, config: Optional[BertConfig] = None, add_pooling_layer: bool = True, **kw):
        super().__init__()
        config = replace(config, **kw) if config is not None else BertConfig(**kw)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF BERT's init: normal(0, 0.02) weights, zero biases, unit LayerNorms, zero padding row."""
        _init_bert(self, std, self.config.pad_token_id)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                prefix_kv: Optional[Sequence[Optional[PrefixKV]]] = None) -> BertOutput:
        """
        Args:
            input_ids: ``(B, S)`` token ids; exactly one of input_ids / inputs_embeds.
            attention_mask: ``(B, S)``, 1 (or True) for real tokens, 0 for padding.
            token_type_ids: ``(B, S)`` segment ids (zeros when None).
            inputs_embeds: ``(B, S, hidden)`` instead of word embeddings (prompt tuning prepends here).
            prefix_kv: per-layer list of ``(prefix_k, prefix_v)`` each ``(Bp, heads, P, head_dim)``, or None.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: expected exactly one of them, got "
                             f"{'both' if input_ids is not None else 'neither'}")
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
        if len(shape) != 2:
            raise ValueError(f"input_ids: expected shape (B, S), got {shape}")
        if prefix_kv is not None and len(prefix_kv) != self.num_layers:
            raise ValueError(f"prefix_kv: expected one entry per layer ({self.num_layers}), got {len(prefix_kv)}")
        hidden = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != shape:
                raise ValueError(f"attention_mask: expected shape {shape}, got {tuple(attention_mask.shape)}")
            # 1/0 -> 0/-large additive (B, 1, 1, S), as HF does
            keep = attention_mask.to(hidden.dtype)
            mask = ((1.0 - keep) * torch.finfo(hidden.dtype).min)[:, None, None, :]
        hidden = self.encoder(hidden, mask, prefix_kv)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BertOutput(hidden, pooled)


class BertForSequenceClassification(nn.Module):
    """``bert`` (with pooler) + ``dropout`` + ``classifier: Linear(hidden, num_labels)``; forward -> logits."""

    def __init__(self, config: Optional[BertConfig] = None, **kw):
        super().__init__()
        config = replace(config, **kw) if config is not None else BertConfig(**kw)
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        with torch.no_grad():
            _init_bert(self.classifier, 0.02, None)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                prefix_kv: Optional[Sequence[Optional[PrefixKV]]] = None) -> torch.Tensor:
        """Same arguments as :meth:`BertModel.forward`; returns logits ``(B, num_labels)``."""
        out = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds, prefix_kv)
        return self.classifier(self.dropout(out.pooler_output))


def _init_bert(module: nn.Module, std: float, pad_token_id: Optional[int]) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
